"""Tasks as one entry: every dataset type is a TASKS entry; a task from outside the package trains and
evaluates."""

from __future__ import annotations

import json
import sqlite3
import sys
import textwrap

import pytest
from conftest import TOY_MODEL_NAME, toy_examples

from dphrl.config import ConfigError, load_config
from dphrl.data.loaders import LOADERS, DatasetSpecError, check_dataset_spec, load_dataset_spec
from dphrl.rewards.registry import REWARDS
from dphrl.tasks import TASKS, TaskSpec, eval_hooks, find_task, task_of_examples

BUILTIN = [
    "bird",
    "gsm8k",
    "hf",
    "jsonl",
    "math",
    "parquet",
    "spider",
    "styles",
    "synthetic_arith",
    "synthetic_sql",
]


def _db(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE pets (name TEXT, age INT)")
        c.execute("INSERT INTO pets VALUES ('a', 1)")


def _sample_specs(tmp_path) -> dict[str, dict]:
    """A tiny spec of every built-in type that needs no optional package."""
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "so\n#### 2"}) + "\n")
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    spider = tmp_path / "spider"
    _db(spider / "database" / "zoo" / "zoo.sqlite")
    (spider / "dev.json").write_text(json.dumps([{"db_id": "zoo", "question": "n?", "query": "SELECT 1"}]))
    bird = tmp_path / "bird"
    _db(bird / "dev_databases" / "zoo" / "zoo.sqlite")
    (bird / "dev.json").write_text(
        json.dumps([{"db_id": "zoo", "question": "n?", "SQL": "SELECT 1", "evidence": ""}])
    )
    return {
        "gsm8k": {"type": "gsm8k", "path": str(gsm)},
        "math": {"type": "math", "path": str(math)},
        "jsonl": {"type": "jsonl", "path": str(rows)},
        "spider": {"type": "spider", "path": str(spider)},
        "bird": {"type": "bird", "path": str(bird)},
        "synthetic_arith": {"type": "synthetic_arith", "n": 2, "seed": 3},
        "synthetic_sql": {"type": "synthetic_sql", "path": str(tmp_path / "syn"), "n": 2, "seed": 1},
        "styles": {"type": "styles", "limit": 2, "seed": 1},
    }


def test_every_builtin_type_is_one_entry_with_a_real_reward(tmp_path):
    assert TASKS.names() == BUILTIN and sorted(LOADERS) == BUILTIN  # LOADERS: a read-only view of TASKS
    for name in BUILTIN:
        task = TASKS.get(name)
        assert isinstance(task, TaskSpec) and task.name == name
        assert callable(task.load_fn()) and LOADERS[name] == task.loader
        assert task.default_reward in REWARDS, (name, task.default_reward)
        assert all(f is None or callable(f) for f in task.hooks())
    for name, spec in _sample_specs(tmp_path).items():  # the examples name the same reward in Example.task
        exs = load_dataset_spec(spec)
        assert exs.dataset_type == name and {e.task for e in exs} == {TASKS[name].default_reward}, name
        assert task_of_examples(exs) is TASKS[name]
    assert [n for n in BUILTIN if TASKS[n].seeded] == ["styles", "synthetic_arith", "synthetic_sql"]
    assert [n for n in BUILTIN if TASKS[n].path_arg is None] == ["styles", "synthetic_arith"]


def test_eval_hooks_come_from_the_task():
    from dphrl.tasks import styles

    assert eval_hooks("styles") == (styles.style_of, styles.final_answer)
    assert eval_hooks(load_dataset_spec({"type": "styles", "limit": 2})) == (
        styles.style_of,
        styles.final_answer,
    )
    assert eval_hooks(styles.make_examples("add", "test", limit=2)) == (styles.style_of, styles.final_answer)
    assert eval_hooks("gsm8k") == (None, None) and eval_hooks(toy_examples(2)) == (None, None)
    assert eval_hooks("no_such_type") == (None, None) and eval_hooks(None) == (None, None)
    assert find_task("no_such_type") is None and find_task("dphrl.no_such_module:x") is None


USER_TASK = '''
    """A task outside dphrl: doubling problems "i+i", graded on the first digit of the response."""
    from dphrl.data.example import Example
    from dphrl.tasks import TaskSpec


    def parity(response):
        """Style: whether the response starts with an even or an odd digit."""
        return ("even" if int(response[0]) % 2 == 0 else "odd") if response[:1].isdigit() else None


    def last_digit(response):
        digits = [c for c in response if c.isdigit()]
        return digits[-1] if digits else None


    def reward(response, ex):
        return float(response[:1] == ex.answer)


    def load(n: int = 8, start: int = 0):
        return [Example(id=f"dbl{i}", prompt=[{"role": "user", "content": f"{i}+{i}"}],
                        answer=str(2 * i % 10), task=__name__ + ":reward") for i in range(start, start + n)]


    def load_file(path, n: int = 2):
        return load(n)


    TASK = TaskSpec("doubling", loader=load, default_reward=__name__ + ":reward", style_fn=parity,
                    answer_fn=last_digit)
'''


@pytest.fixture
def user_task(tmp_path, monkeypatch):
    """A module on sys.path (not in dphrl) with a TaskSpec, plain loader functions and a reward."""
    name = "dphrl_test_user_task"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_user_task_or_loader_is_a_dataset_type(tmp_path, user_task):
    task = find_task(f"{user_task}:TASK")
    assert task is not None and task.name == "doubling" and REWARDS.get(task.default_reward) is not None
    exs = load_dataset_spec({"type": f"{user_task}:TASK", "n": 3, "start": 1})
    assert [e.answer for e in exs] == ["2", "4", "6"] and exs.dataset_type == f"{user_task}:TASK"
    style_fn, answer_fn = eval_hooks(exs)
    assert (style_fn("4="), answer_fn("4=12"), style_fn("x")) == ("even", "2", None)
    # a plain loader function is a task without hooks; its 'path' parameter (if any) takes the spec's path
    bare = load_dataset_spec({"type": f"{user_task}:load", "n": 2})
    assert len(bare) == 2 and eval_hooks(bare) == (None, None)
    assert (
        find_task(f"{user_task}:load").path_arg is None
        and find_task(f"{user_task}:load_file").path_arg == "path"
    )
    assert len(load_dataset_spec({"type": f"{user_task}:load_file", "path": "x.txt"})) == 2
    with pytest.raises(DatasetSpecError, match="takes no 'path'"):
        check_dataset_spec({"type": f"{user_task}:load", "path": "x.txt"})
    with pytest.raises(DatasetSpecError, match=r"unknown option\(s\) \['strat'\].*Did you mean 'start'") as e:
        check_dataset_spec({"type": f"{user_task}:TASK", "strat": 2})
    assert e.value.key == "strat"
    with pytest.raises(DatasetSpecError, match="cannot import 'NOPE'") as e:
        check_dataset_spec({"type": f"{user_task}:NOPE"})
    assert e.value.key == "type"
    with pytest.raises(DatasetSpecError, match="expected a dphrl.tasks.TaskSpec or a loader function"):
        check_dataset_spec({"type": f"{user_task}:__name__"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndataset: {type: no_such_user_module:TASK}\n")
    with pytest.raises(
        ConfigError, match=r"config key 'dataset\.type'.*cannot import module 'no_such_user_module'"
    ):
        load_config(bad)


def test_a_user_task_trains_and_evaluates_with_its_hooks(tmp_path, user_task, tok, make_model):
    """``dataset: {type: my_mod:TASK}`` in a recipe: the trainer uses the task's reward; ``dphrl eval`` on the
    trained model labels that dataset with the task's style/answer hooks and leaves a hook-less one alone."""
    from dphrl.cli import main
    from dphrl.trainer import Trainer

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {TOY_MODEL_NAME}\nalgorithm: grpo\ndataset: {{type: {user_task}:TASK, n: 8}}\n"
    )
    out = tmp_path / "run"
    cfg = load_config(
        recipe,
        prompts_per_step=4,
        rollout_n=4,
        max_new_tokens=3,
        max_steps=1,
        micro_batch_size=8,
        generation_batch_size=64,
        reward_workers=0,
        progress=False,
        output_dir=str(out),
    )
    assert cfg.dataset == {"type": f"{user_task}:TASK", "n": 8} and cfg.reward == ""
    trainer = Trainer(cfg, model=make_model(), tokenizer=tok)
    assert trainer.reward_fn is sys.modules[user_task].reward  # the examples' task: the module's reward
    trainer.train()
    assert (out / "final" / "config.json").is_file()

    rows = tmp_path / "plain.jsonl"  # a hook-less dataset beside it, scored with the same reward
    rows.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}", "answer": str(2 * i % 10)}) + "\n" for i in range(3))
    )
    res_dir = tmp_path / "eval"
    rc = main([
        "eval", "--model", str(out / "final"), "--data", f"mine={{type: {user_task}:TASK, n: 3, start: 2}}",
        "--data", "plain=" + json.dumps({"type": "jsonl", "path": str(rows), "task": f"{user_task}:reward"}),
        "--n", "2", "--max-new-tokens", "3", "--reward-workers", "0", "--out", str(res_dir), "--engine", "hf",
    ])
    assert rc == 0
    res = json.loads((res_dir / "results.json").read_text())
    assert res["config"]["style_fn"] == {"mine": f"{user_task}:parity", "plain": None}
    assert res["config"]["answer_fn"] == {"mine": f"{user_task}:last_digit", "plain": None}
    assert res["config"]["rewards"] == {"mine": f"{user_task}:reward", "plain": f"{user_task}:reward"}
    mine, plain = res["datasets"]["mine"], res["datasets"]["plain"]
    assert "styles" in mine and "styles" not in plain and mine["num_problems"] == 3
    samples = [json.loads(line) for line in (res_dir / "samples.jsonl").read_text().splitlines()]
    parity = sys.modules[user_task].parity
    for s in samples:
        assert ("style" in s) == (s["dataset"] == "mine")
        if s["dataset"] == "mine":
            assert s["style"] == parity(s["response"])
