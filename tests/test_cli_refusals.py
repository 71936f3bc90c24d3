"""Every refusal is one clean ``dphrl: <message>`` paragraph with exit 2 (``--debug`` shows the traceback),
a model path that can only be local is never sent to the hub, and every command that writes a directory
holds its lock: in process, on a tiny styles model saved to disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dphrl.cli import main
from dphrl.errors import UserError
from dphrl.rundir import claim_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = "add={type: styles, op: add, split: test, limit: 2}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from dphrl.data.tokenizer import build_char_tokenizer
    from dphrl.sft import save_model
    from dphrl.tasks import styles
    from dphrl.testing import tiny_causal_lm

    tok = build_char_tokenizer(styles.CHARS)
    d = tmp_path_factory.mktemp("refusals") / "model"
    save_model(tiny_causal_lm(tok, hidden=32, layers=2, heads=4, max_positions=64, seed=3), tok, d)
    return d


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """No test here may ask the Hugging Face Hub anything."""
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("the Hugging Face Hub was asked")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    monkeypatch.delenv("DPHRL_DEBUG", raising=False)


def _cfg(tmp_path: Path, model: Path, **kw) -> Path:
    cfg = {
        "model": str(model), "algorithm": "grpo", "reward": "styles", "engine": "hf", "reward_workers": 0,
        "dataset": {"type": "styles", "op": "add", "split": "train", "limit": 8}, "prompts_per_step": 4,
        "rollout_n": 2, "max_new_tokens": 4, "max_steps": 2, "micro_batch_size": 8, "progress": False,
        "output_dir": str(tmp_path / "run"), **kw,
    }
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _refused(capsys, argv: list[str], *names: str) -> str:
    """``main(argv)`` exits 2 with one ``dphrl:`` message naming each of ``names``, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("dphrl: ") and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


def _eval(model: Path | str, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", DATA, "--n", "2", "--max-new-tokens", "3",
            "--engine", "hf", "--reward-workers", "0", "--out", str(out), *extra]


# ------------------------------------------------------------------------------ 1. clean refusals, exit 2
@pytest.mark.parametrize("extra,named", [
    (["--n", "0"], "--n 0"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--limit", "0"], "--limit 0"),
    (["--reward", "nosuch"], "config key 'reward': unknown reward 'nosuch'"),
    (["--reward", "nosuch:fn"], "cannot import module 'nosuch'"),
    (["--engine", "nosuch"], "config key 'engine': unknown engine 'nosuch'"),
    (["--kv-budget-mb", "-1"], "--kv-budget-mb -1"),
])
def test_eval_options_out_of_range_are_refused(tmp_path, model_dir, capsys, extra, named):
    _refused(capsys, _eval(model_dir, tmp_path / "out", *extra), named)
    assert not (tmp_path / "out").exists()


def test_a_model_directory_without_tokenizer_or_config_is_refused(tmp_path, model_dir, capsys):
    no_tok = tmp_path / "no_tok"
    shutil.copytree(model_dir, no_tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    _refused(capsys, _eval(no_tok, tmp_path / "a"), str(no_tok), "no tokenizer files")
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    (no_cfg / "weights.bin").write_bytes(b"x")
    _refused(capsys, _eval(no_cfg, tmp_path / "b"), str(no_cfg), "without config.json")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    _refused(capsys, _eval(no_weights, tmp_path / "c"), str(no_weights), "could not be loaded")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_report_on_a_missing_or_empty_directory_is_refused(tmp_path, capsys):
    _refused(capsys, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "rep")],
             str(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")],
             str(tmp_path / "empty"), "results.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    _refused(capsys, ["report", str(tmp_path / "bad"), "--out", str(tmp_path / "rep")],
             str(tmp_path / "bad" / "results.json"), "not valid JSON")
    assert not (tmp_path / "rep").exists()


def test_train_refusals_name_the_key_or_file(tmp_path, model_dir, capsys):
    cfg = _cfg(tmp_path, model_dir, save_every=1, keep_last=2)
    _refused(capsys, ["train", "--config", str(cfg), "max_prompt_tokens=2"], "max_prompt_tokens", "at least")
    assert not (tmp_path / "run").exists()
    assert main(["train", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    ck = tmp_path / "run" / "checkpoints" / "step_000001"
    weights = ck / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    _refused(capsys, ["train", "--config", str(cfg), "--resume", str(ck)], "model.safetensors")
    run, lines = tmp_path / "run", out.splitlines()  # the run ends with a short human summary, no JSON dump
    head = rf"dphrl train: grpo on {re.escape(str(model_dir))}: 2 steps done \(2 in this run, \d+ s\)"
    assert re.fullmatch(head, lines[-4]), lines
    assert re.fullmatch(r"  last step: reward \d\.\d{3}, pass rate \d\.\d{3}, \d+\.\d\d s/step", lines[-3])
    assert lines[-2:] == [f"  final model: {run / 'final'}",
                          f"  metrics: {run / 'metrics.jsonl'} (one JSON line per step)"]
    assert "{" not in out


def test_store_refusals_name_the_store_file_or_field(tmp_path, model_dir, capsys):
    store = tmp_path / "store"
    cfg = _cfg(tmp_path, model_dir, algorithm="dph", reference_store=str(store), presample_n=2)
    assert main(["presample", "--config", str(cfg)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    _refused(capsys, ["train", "--config", str(cfg), f"reference_store={tmp_path / 'none'}"],
             str(tmp_path / "none"), "no manifest.json", "dphrl presample")
    _refused(capsys, ["train", "--config", str(cfg), "temperature=0.5"], str(store), "temperature")
    samples = store / "samples.parquet"
    samples.write_bytes(samples.read_bytes()[:-8] + b"damaged!")
    _refused(capsys, ["train", "--config", str(cfg)], str(samples))
    assert not (tmp_path / "run").exists()


def test_a_failing_reward_refuses_presample_and_writes_nothing(tmp_path, model_dir, capsys, monkeypatch):
    (tmp_path / "badreward.py").write_text("def reward(response, ex):\n    raise ValueError('no field')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _cfg(tmp_path, model_dir, algorithm="dph", reward="badreward:reward",
               reference_store=str(tmp_path / "store"), presample_n=2)
    _refused(capsys, ["presample", "--config", str(cfg)], "reward evaluations failed",
             "max_reward_failure_frac")
    assert not (tmp_path / "store").exists()


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, model_dir, monkeypatch, capsys):
    argv = _eval(model_dir, tmp_path / "out", "--n", "0")
    with pytest.raises(UserError, match="--n 0"):
        main(["--debug", *argv])
    with pytest.raises(UserError, match="--n 0"):
        main([*argv, "--debug"])
    monkeypatch.setenv("DPHRL_DEBUG", "1")
    with pytest.raises(UserError, match="--n 0"):
        main(argv)
    monkeypatch.delenv("DPHRL_DEBUG")

    def bug(args):
        raise KeyError("a bug of ours")

    monkeypatch.setattr("dphrl.cli.cmd_config", bug)
    with pytest.raises(KeyError):  # not a refusal: the traceback stays
        main(["config"])


# ----------------------------------------------------- 2. a local-looking model path never goes to the hub
@pytest.mark.parametrize("name", ["./x", ".x", "../x", "/abs/x", "~/no_such_dir_dphrl/x", "a/b/c", "runs/x"])
def test_a_local_looking_model_path_is_refused_without_the_hub(tmp_path, monkeypatch, name):
    from dphrl.models import ModelNotFoundError, check_model_available

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # 'runs/x': its parent exists here, so it is a path, not org/name
    t0 = time.time()
    with pytest.raises(ModelNotFoundError, match="does not exist.*never looked up on the Hugging Face Hub"):
        check_model_available(name)
    assert time.time() - t0 < 1


def test_a_missing_model_is_refused_at_once_by_every_command(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    cfg = _cfg(tmp_path, Path("runs/nonexistent"), algorithm="dph", reference_store=str(tmp_path / "store"))
    for argv in (["train", "--config", str(cfg)], ["presample", "--config", str(cfg)],
                 _eval("runs/nonexistent", tmp_path / "e")):
        t0 = time.time()
        _refused(capsys, argv, "model path runs/nonexistent does not exist")
        assert time.time() - t0 < 5, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "runs"]


def test_a_hub_id_the_hub_cannot_give_is_refused_fast(tmp_path, monkeypatch):
    """``org/name`` with no such path here and not in the cache: one short request, not minutes of retries."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    from dphrl.models import ModelNotFoundError, check_model_available

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="no file or directory nosuch/model here.*HF_HUB_OFFLINE"):
        check_model_available("nosuch/model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id, timeout=None, **kw):
        assert timeout is not None and timeout <= 10
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModelNotFoundError, match="cannot be reached.*Name or service not known"):
        check_model_available("nosuch/model")

    class NotFound(RepositoryNotFoundError):
        def __init__(self, msg: str):  # without an HTTP response object
            OSError.__init__(self, msg)

    def unknown(self, repo_id, timeout=None, **kw):
        raise NotFound("404 Repository Not Found")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unknown)
    with pytest.raises(ModelNotFoundError, match="has no model nosuch/model"):
        check_model_available("nosuch/model")


# ---------------------------------------------------- 3. every command that writes a directory locks it
def _hold_lock_in_another_process(out: Path) -> subprocess.Popen:
    code = ("import sys, time; from dphrl.rundir import claim_dir; claim_dir(sys.argv[1], what='other', "
            "overwrite=True); print('held', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _state(d: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.iterdir()}


def test_a_second_eval_into_a_busy_out_is_refused_and_changes_nothing(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    proc = _hold_lock_in_another_process(out)  # a first eval still running there
    try:
        before = _state(out)
        _refused(capsys, _eval(model_dir, out), str(out), "in use by pid")
        _refused(capsys, _eval(model_dir, out, "--overwrite"), "in use by pid")
        assert _state(out) == before
    finally:
        proc.kill()
        proc.wait()
    assert main(_eval(model_dir, out)) == 0  # the lock died with its holder
    assert (out / "results.json").is_file()


def test_eval_presample_and_report_hold_their_lock(tmp_path, model_dir, capsys):
    """The same process holding the lock (as a concurrent run would): each command refuses and changes
    nothing."""
    store = tmp_path / "store"
    cfg = _cfg(tmp_path, model_dir, algorithm="dph", reference_store=str(store), presample_n=2)
    for out, argv in ((tmp_path / "e", _eval(model_dir, tmp_path / "e")),
                      (store, ["presample", "--config", str(cfg)]),
                      (tmp_path / "rep", ["report", str(tmp_path / "e0"), "--out", str(tmp_path / "rep")])):
        (tmp_path / "e0").mkdir(exist_ok=True)
        (tmp_path / "e0" / "results.json").write_text(json.dumps({"datasets": {}}))
        lock = claim_dir(out, what="other")
        try:
            before = _state(out)
            _refused(capsys, argv, str(out), "in use by pid")
            assert _state(out) == before
        finally:
            lock.release()


def test_report_out_is_a_report_directory_unless_overwrite(tmp_path, model_dir, capsys):
    ev = tmp_path / "ev"
    assert main(_eval(model_dir, ev)) == 0
    rep = tmp_path / "rep"
    assert main(["report", str(ev), "--out", str(rep)]) == 0
    assert main(["report", str(ev), "--out", str(rep)]) == 0  # a previous report is simply replaced
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = _state(mine)
    _refused(capsys, ["report", str(ev), "--out", str(mine)], str(mine), "--overwrite")
    _refused(capsys, ["report", str(ev), "--out", str(mine), "--overwrite"], "not a dphrl run")
    assert _state(mine) == before
    ev_before = (ev / "results.json").read_bytes()
    _refused(capsys, ["report", str(ev), "--out", str(ev)], str(ev))
    assert main(["report", str(ev), "--out", str(ev), "--overwrite"]) == 0  # into a dphrl directory: added
    assert (ev / "report.md").is_file() and (ev / "results.json").read_bytes() == ev_before


# ------------------------------------------------------------------ 6. eval selects problems by id or filter
ALL = "add={type: styles, op: add, split: test}"


def test_eval_selects_problems_by_id_and_by_field(tmp_path, model_dir, capsys):
    from dphrl.data import load_examples

    exs = load_examples({"type": "styles", "op": "add", "split": "test"})
    ids = [exs[5].id, exs[2].id]
    (tmp_path / "ids.txt").write_text(f"# two problems\n{exs[7].id}\n\n")
    out = tmp_path / "by_id"
    argv = _eval(model_dir, out, "--ids", ",".join(ids), "--ids-file", str(tmp_path / "ids.txt"))
    argv[argv.index(DATA)] = ALL
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["datasets"]["add"]["num_problems"] == 3
    assert res["config"]["selection"] == {"ids": [*ids, exs[7].id], "where": []}
    got = [json.loads(x)["id"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert list(dict.fromkeys(got)) == [ex.id for ex in exs if ex.id in {*ids, exs[7].id}]  # in dataset order

    b = exs[0].meta["b"]
    want = [ex for ex in exs if ex.meta["b"] == b]
    out = tmp_path / "where"
    argv = _eval(model_dir, out, "--where", f"b={b}", "--where", "op=add", "--limit", "2")
    argv[argv.index(DATA)] = ALL
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["datasets"]["add"]["num_problems"] == min(2, len(want))
    assert res["config"]["selection"]["where"] == [f"b={b}", "op=add"]


@pytest.mark.parametrize("extra,named", [
    (["--ids", "add-999-999"], "'add-999-999'"),
    (["--where", "bb=3"], "has no field 'bb'. Did you mean 'b'?"),
    (["--where", "b=999"], "--where b=999 matches no problem of --data add"),
    (["--ids-file", "no_such_ids.txt"], "--ids-file no_such_ids.txt does not exist"),
])
def test_eval_selection_that_matches_nothing_is_refused(tmp_path, model_dir, capsys, extra, named):
    argv = _eval(model_dir, tmp_path / "out", *extra)
    argv[argv.index(DATA)] = ALL
    _refused(capsys, argv, named)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# SIGTERM outside the training loop (start-up, evaluation, after the final save)


def test_sigterm_outside_the_training_loop_exits_143_with_a_message(monkeypatch, capsys):
    import signal

    import dphrl.cli as cli

    def slow_command(args):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the command works, e.g. loading a model
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "cmd_config", slow_command)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["config"]) == 143
    err = capsys.readouterr().err
    assert err.startswith("dphrl: config: stopped by SIGTERM") and "--resume latest" in err
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_sigterm_during_start_up_of_a_real_process(tmp_path):
    import signal

    code = ("import sys, time, dphrl.cli as c\n"
            "def wait(args):\n    print('ready', flush=True)\n    time.sleep(30)\n"
            "c.cmd_config = wait\nsys.exit(c.main(['config']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 143 and time.monotonic() - t0 < 10
    assert "dphrl: config: stopped by SIGTERM" in err and "Traceback" not in err


def test_eval_says_when_the_kv_budget_makes_batches_smaller(tmp_path, model_dir, capsys):
    assert main(_eval(model_dir, tmp_path / "out", "--kv-budget-mb", "0.01", "--batch-size", "64")) == 0
    err = capsys.readouterr().err
    assert re.search(r"batches of \d+ sequences, not 64: .* --kv-budget-mb 0.01", err), err
    assert json.loads((tmp_path / "out" / "results.json").read_text())
