"""The eval runner with a deterministic fake engine: exact metrics, files, rescore, comparisons."""

from __future__ import annotations

import json

import pytest

from dphrl.data.example import Example
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.engines.base import Generation
from dphrl.evaluation import evaluate, rescore
from dphrl.evaluation.runner import compare_to_base, dataset_metrics, format_table, load_samples
from dphrl.rewards.registry import BatchScores

# Per problem (keyed by the prompt text): sampled responses (cycled) and the greedy one.
SCRIPT = {
    "add 3 4": (["ans 7", "so ans 7", "ans 7", "ans 7"], "ans 7"),  # 4/4 correct
    "add 2 3": (["ans 5", "ans 6", "ans 6", "ans 5"], "ans 6"),  # 2/4, greedy wrong
    "add 1 1": (["ans 3", "ans 4", "boom", "ans 3"], "ans 3"),  # 0/4, one reward failure
}


class FakeEngine:
    """Deterministic engine: responses from SCRIPT; records its calls."""

    model_name = "fake-model"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.calls = []

    def generate(
        self, prompts, n=1, *, max_new_tokens=64, temperature=1.0, top_p=1.0, greedy=False, seed=None
    ):
        self.calls.append(
            dict(num=len(prompts), n=n, greedy=greedy, seed=seed, temperature=temperature, top_p=top_p)
        )
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            key = next(k for k in SCRIPT if k in text)
            sampled, g = SCRIPT[key]
            texts = [g] * n if greedy else [sampled[i % len(sampled)] for i in range(n)]
            gens = []
            for t in texts:
                ids = self.tok(t, add_special_tokens=False)["input_ids"]
                finished = t != "ans 4"  # one truncated response
                gens.append(
                    Generation(list(p), ids + ([1] if finished else []), [0.0] * len(ids), t, finished)
                )
            out.append(gens)
        return out


def answer_fn(r: str) -> str | None:
    return r.split()[-1] if r.startswith(("ans", "so")) else None


def reward(response: str, ex: Example) -> float:
    if response == "boom":
        raise RuntimeError("reward crashed")
    return 1.0 if answer_fn(response) == ex.answer else 0.0


def style_fn(r: str) -> str | None:
    return "verbose" if r.startswith("so") else ("terse" if r.startswith("ans") else None)


def make_examples():
    return [
        Example(id="p0", prompt=[{"role": "user", "content": "add 3 4"}], answer="7", task="toy"),
        Example(id="p1", prompt=[{"role": "user", "content": "add 2 3"}], answer="5", task="toy"),
        Example(id="p2", prompt=[{"role": "user", "content": "add 1 1"}], answer="2", task="toy"),
    ]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture
def run(tok, tmp_path):
    engine = FakeEngine(tok)
    res = evaluate(
        engine,
        tok,
        {"toy": make_examples()},
        {"toy": reward},
        n=4,
        seed=3,
        out_dir=tmp_path / "eval",
        answer_fn=answer_fn,
        style_fn=style_fn,
        progress=False,
        show_table=False,
        prompts_per_call=2,
    )
    return engine, res, tmp_path / "eval"


def test_exact_metrics(run):
    _, res, _ = run
    m = res["datasets"]["toy"]
    assert m["num_problems"] == 3 and m["n"] == 4 and m["ks"] == [1, 2, 4]
    assert m["greedy"] == pytest.approx(1 / 3)  # only p0's greedy is right
    assert m["mean@n"] == pytest.approx(6 / 12)
    assert m["mean_reward"] == pytest.approx(6 / 12)
    # correct counts c = 4, 2, 0 with n = 4
    assert m["pass@k"]["1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["pass@k"]["2"] == pytest.approx((1 + (1 - 1 / 6) + 0) / 3)  # 1 - C(2,2)/C(4,2)
    assert m["pass@k"]["4"] == pytest.approx(2 / 3)
    # maj@k: p0 always 7 (right); p1: k=1 "5" right, k=2 tie 5/6 -> "5" right, k=4 tie -> "5" right;
    # p2: k=1 "3", k=2 tie 3/4 -> "3", k=4 "3" x2 -> wrong
    assert m["maj@k"] == {"1": pytest.approx(2 / 3), "2": pytest.approx(2 / 3), "4": pytest.approx(2 / 3)}
    assert m["per_problem"] == {
        "id": ["p0", "p1", "p2"],
        "correct": [4, 2, 0],
        "greedy": [True, False, False],
    }
    assert m["reward_failures"] == 1 and m["reward_timeouts"] == 0
    assert m["truncated"] == pytest.approx(1 / 12)
    div = m["diversity"]
    assert div["distinct_correct_answers"] == pytest.approx((1 + 1 + 0) / 3)  # p2 has no correct one
    # p0: {"ans 7", "so ans 7"} = 2; p1: {"ans 5"} = 1; p2: 0
    assert div["distinct_correct_solutions"] == pytest.approx((2 + 1 + 0) / 3)
    assert div["similarity_method"] == "jaccard_word_bigrams"
    st = m["styles"]
    assert st["shares"] == {"terse": pytest.approx(10 / 11), "verbose": pytest.approx(1 / 11)}
    assert st["unlabeled"] == pytest.approx(1 / 12)
    assert st["accuracy"] == {"terse": pytest.approx(5 / 10), "verbose": 1.0}
    cfg = res["config"]
    assert cfg["n"] == 4 and cfg["seed"] == 3 and cfg["temperature"] == 1.0 and cfg["top_p"] == 1.0
    assert cfg["model"] == "fake-model" and cfg["reward_failures"] == {"toy": 1}


def test_engine_calls_batched_and_seeded(run):
    engine, _, _ = run
    sampled = [c for c in engine.calls if not c["greedy"]]
    greedy = [c for c in engine.calls if c["greedy"]]
    assert [c["num"] for c in sampled] == [2, 1] and all(c["n"] == 4 for c in sampled)
    assert [c["num"] for c in greedy] == [2, 1] and all(c["n"] == 1 for c in greedy)
    assert [c["seed"] for c in sampled] == [3, 5]  # seed + chunk start


def test_files(run):
    _, res, out = run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["datasets"] == res["datasets"] and on_disk["config"] == res["config"]
    recs = load_samples(out / "samples.jsonl")
    assert len(recs) == 3 * (4 + 1)
    fields = {"dataset", "problem", "id", "index", "response", "reward", "correct", "finished", "num_tokens"}
    assert all(fields <= set(r) for r in recs)
    greedy = [r for r in recs if r["index"] == -1]
    assert [(r["id"], r["response"], r["reward"]) for r in greedy] == [
        ("p0", "ans 7", 1.0),
        ("p1", "ans 6", 0.0),
        ("p2", "ans 3", 0.0),
    ]
    errors = [r for r in recs if "reward_error" in r]
    if "errors" in BatchScores.__dataclass_fields__:  # score_batch reports per-item errors
        assert [(r["id"], r["response"]) for r in errors] == [("p2", "boom")]
        assert "reward crashed" in errors[0]["reward_error"]
    first = recs[0]
    assert first["dataset"] == "toy" and first["index"] == 0 and first["num_tokens"] == len("ans 7") + 1
    assert first["answer"] == "7" and first["style"] == "terse" and first["correct"] is True


def test_rescore_reproduces_exactly(run):
    _, res, out = run
    again = rescore(
        out / "samples.jsonl",
        {"toy": make_examples()},
        {"toy": reward},
        answer_fn=answer_fn,
        style_fn=style_fn,
    )
    assert again["datasets"] == res["datasets"]  # identical numbers, not approximately
    stored = rescore(out / "samples.jsonl")  # no reward fns: stored rewards and labels
    assert stored["datasets"] == res["datasets"]
    assert stored["config"]["n"] == 4 and stored["config"]["reward_failures"] == {"toy": 1}


def test_rescore_with_other_reward_changes_numbers(run, tmp_path):
    _, _, out = run

    def lenient(response: str, ex: Example) -> float:
        return 1.0 if response != "boom" else 0.0

    new = rescore(out / "samples.jsonl", {"toy": make_examples()}, {"toy": lenient}, out_dir=tmp_path / "re")
    m = new["datasets"]["toy"]
    assert m["per_problem"]["correct"] == [4, 4, 3] and m["greedy"] == 1.0 and m["reward_failures"] == 0
    assert json.loads((tmp_path / "re" / "results.json").read_text())["datasets"]["toy"] == m
    with pytest.raises(ValueError, match="needs its examples"):
        rescore(out / "samples.jsonl", None, {"toy": lenient})


def test_no_answer_fn_no_greedy(tok):
    res = evaluate(
        FakeEngine(tok),
        tok,
        {"a": make_examples()[:1]},
        reward,
        n=3,
        greedy=False,
        progress=False,
        show_table=False,
    )
    m = res["datasets"]["a"]
    assert "maj@k" not in m and "styles" not in m and m["greedy"] is None
    assert m["ks"] == [1, 2, 3] and m["pass@k"]["3"] == 1.0
    assert m["diversity"]["distinct_correct_answers"] is None


def test_compare_to_base_and_table(run):
    _, res, _ = run
    base = json.loads(json.dumps(res))
    base["datasets"]["toy"]["pass@k"] = {"1": 0.3, "2": 0.6, "4": 0.9}
    base["datasets"]["toy"]["greedy"] = 0.5
    d = compare_to_base(res, base)["toy"]
    assert d["pass@k"]["1"] == pytest.approx(0.5 - 0.3)
    assert d["pass@k"]["4"] == pytest.approx(2 / 3 - 0.9)
    assert d["greedy"] == pytest.approx(1 / 3 - 0.5) and d["mean@n"] == 0.0
    assert compare_to_base(res, {"datasets": {"other": {}}}) == {}
    table = format_table(res)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["dataset", "problems", "greedy", "mean@4", "pass@1"]
    assert lines[2].split()[:7] == ["toy", "3", "33.3", "50.0", "50.0", "61.1", "66.7"]


def test_dataset_metrics_unequal_n():
    recs = [
        {"problem": 0, "id": "a", "index": i, "response": "x", "reward": r, "finished": True, "num_tokens": 1}
        for i, r in enumerate([1.0, 0.0, 0.0, 0.0])
    ] + [
        {"problem": 1, "id": "b", "index": i, "response": "y", "reward": r, "finished": True, "num_tokens": 1}
        for i, r in enumerate([1.0, 1.0])
    ]
    m = dataset_metrics(recs)
    assert m["n"] == 2 and m["ks"] == [1, 2]
    assert m["pass@k"]["2"] == pytest.approx((0.5 + 1.0) / 2)  # each problem with its own n
