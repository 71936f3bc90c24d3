"""Checkpoints hold tensors, not code: safetensors weights (the adapter only under LoRA), optimizer
state loaded with ``weights_only=True``, JSON for the rest, a sha256 per file in the completion marker.
A planted pickle is refused without running, a flipped byte is refused by file name with the previous
complete checkpoint offered, and a torn metrics line is repaired at resume."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import base_cfg, toy_examples

from dphrl.checkpoint import CHECKPOINT_MARKER, CheckpointError, verify_checkpoint
from dphrl.fsutil import sha256_file
from dphrl.trainer import Trainer

EXS = toy_examples(8)


def _train(tmp_path: Path, tok, make_model, steps: int, **kw) -> Trainer:
    cfg = base_cfg(tmp_path, "grpo", max_steps=steps, save_every=1, keep_last=2, **kw)
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=EXS)
    t.train()
    return t


def _resume(tmp_path: Path, tok, make_model, steps: int, path="latest", model=None, **kw) -> Trainer:
    cfg = base_cfg(tmp_path, "grpo", max_steps=steps, save_every=1, keep_last=2, **kw)
    t = Trainer(cfg, model=model or make_model(seed=5), tokenizer=tok, examples=EXS)
    t.resume(path)
    return t


def _rehash(ck: Path) -> None:
    """What an attacker who edits a checkpoint can do too: rewrite the marker's checksums."""
    marker = json.loads((ck / CHECKPOINT_MARKER).read_text())
    marker["files"] = {n: sha256_file(ck / n) for n in marker["files"]}
    (ck / CHECKPOINT_MARKER).write_text(json.dumps(marker))


class _Exploit:
    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_a_planted_pickle_is_refused_without_running(tmp_path, tok, make_model):
    t = _train(tmp_path, tok, make_model, 2)
    ck = t.out / "checkpoints" / "step_000001"
    flag = tmp_path / "pwned"
    with open(ck / "optimizer.pt", "wb") as f:
        pickle.dump({"state": {}, "param_groups": [], "x": _Exploit(str(flag))}, f)
    _rehash(ck)  # the checksums match: only the loader stands in the way
    with pytest.raises(CheckpointError, match="optimizer.pt.*not only tensors"):
        _resume(tmp_path, tok, make_model, 3, ck)
    assert not flag.exists()


def test_an_old_pickled_checkpoint_is_refused(tmp_path, tok, make_model):
    t = _train(tmp_path, tok, make_model, 2)
    ck = t.out / "checkpoints" / "step_000001"
    (ck / CHECKPOINT_MARKER).write_text(json.dumps({"step": 1, "world_size": 1}))  # the old marker: no files
    with pytest.raises(CheckpointError, match="older dphrl.*pickle"):
        _resume(tmp_path, tok, make_model, 3)


def test_a_flipped_byte_is_refused_by_name_and_the_previous_checkpoint_offered(tmp_path, tok, make_model):
    t = _train(tmp_path, tok, make_model, 3)
    latest = t.out / "checkpoints" / "step_000002"
    original = (latest / "model.safetensors").read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x01
    (latest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        _resume(tmp_path, tok, make_model, 4)
    msg = str(e.value)
    assert "model.safetensors is damaged" in msg and "step_000001" in msg and "--resume" in msg
    (latest / "model.safetensors").write_bytes(original)
    (latest / "rng_0.json").unlink()
    with pytest.raises(CheckpointError, match="rng_0.json is missing"):
        verify_checkpoint(latest)
    # the offered checkpoint resumes (and is itself verified)
    _resume(tmp_path, tok, make_model, 4, t.out / "checkpoints" / "step_000001").train()


def test_resume_before_any_checkpoint_says_how_to_start_again(tmp_path, tok, make_model):
    cfg = base_cfg(tmp_path, "grpo", max_steps=1)
    with pytest.raises(CheckpointError, match="no complete checkpoint.*--overwrite"):
        Trainer(cfg, model=make_model(), tokenizer=tok, examples=EXS).resume("latest")


def test_lora_checkpoints_hold_the_adapter_only_and_resume_exactly(tmp_path, tok, make_model):
    lora = dict(lora=True, lora_r=4, lr=5e-2)
    full = base_cfg(tmp_path / "full", "grpo", max_steps=3, **lora)
    a = Trainer(full, model=make_model(), tokenizer=tok, examples=EXS)
    a.train()
    t = _train(tmp_path, tok, make_model, 2, **lora)
    ck = t.out / "checkpoints" / "step_000001"
    from safetensors.torch import load_file

    names = set(load_file(str(ck / "model.safetensors")))
    assert names and all("lora_" in n for n in names)  # no frozen base weight in the checkpoint
    assert json.loads((ck / "trainer_state.json").read_text())["weights"] == "adapter"
    b = _resume(tmp_path, tok, make_model, 3, model=make_model(), **lora)  # the run's base model
    b.train()
    for (n, x), y in zip(a._unwrapped().state_dict().items(), b._unwrapped().state_dict().values()):
        assert torch.equal(x, y), n
    with pytest.raises(CheckpointError, match="other base weights"):
        _resume(tmp_path, tok, make_model, 3, model=make_model(seed=9), **lora)


def test_a_torn_metrics_line_is_repaired_at_resume(tmp_path, tok, make_model, capsys):
    t = _train(tmp_path, tok, make_model, 2)
    with open(t.out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')  # a kill mid-write
    b = _resume(tmp_path, tok, make_model, 3)
    assert "dropped 1 torn line" in capsys.readouterr().out
    b.train()
    steps = [json.loads(x)["step"] for x in (t.out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_overwrite_replaces_only_a_directory_dphrl_wrote_and_a_refusal_changes_nothing(tmp_path):
    from dphrl.rundir import LOCK_NAME, RunDirError, claim_dir

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match="not a dphrl run.*Nothing was changed"):
        claim_dir(thesis, what="dphrl train", overwrite=True)
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.tex"]  # no lock file written either
    run = tmp_path / "run"
    claim_dir(run, what="t").release()
    (run / "metrics.jsonl").write_text("{}\n")
    lock_before = (run / LOCK_NAME).read_bytes()
    os.utime(run / LOCK_NAME, (1, 1))
    with pytest.raises(RunDirError, match="already holds a run"):
        claim_dir(run, what="t")
    assert (run / LOCK_NAME).read_bytes() == lock_before and (run / LOCK_NAME).stat().st_mtime == 1
    claim_dir(run, what="t", overwrite=True).release()  # ours: replaced
    assert [p.name for p in run.iterdir()] == [LOCK_NAME]


def test_presample_refuses_a_reward_that_fails_and_writes_nothing(tmp_path, tok, make_model):
    from dphrl.engines.hf import HFEngine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import presample
    from dphrl.rewards.registry import RewardFailureError

    def broken(response, example):
        raise ValueError("no answer field")

    out = tmp_path / "store"
    with pytest.raises(RewardFailureError, match=r"16 of 16 reward evaluations failed.*nothing was written"):
        presample(HFEngine(make_model(), tok), tok, toy_examples(4), broken, out, model_name="toy",
                  tokenizer_hash=tokenizer_hash(tok), n=4, max_new_tokens=3, progress=False, reward_workers=0)
    assert not out.exists() or not any(out.iterdir())


def test_a_key_given_twice_in_a_config_file_is_refused_with_both_lines(tmp_path):
    from dphrl.config import ConfigError, load_config

    f = tmp_path / "cfg.yaml"
    f.write_text("model: m\nalgorithm: grpo\nlr: 1.0e-5\ndataset: {type: gsm8k, limit: 4}\nlr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: key 'lr' is given twice, on lines 3 and 5"):
        load_config(f)
    f.write_text("model: m\nalgorithm: grpo\ndataset:\n  type: gsm8k\n  limit: 4\n  limit: 8\n")
    with pytest.raises(ConfigError, match=r"key 'dataset.limit' is given twice, on lines 5 and 6"):
        load_config(f)


def test_duplicate_example_ids_are_refused(tmp_path):
    from dphrl.data.loaders import load_dataset_spec

    f = tmp_path / "d.jsonl"
    f.write_text('{"id": "a", "question": "1+1", "answer": "2"}\n'
                 '{"id": "b", "question": "2+2", "answer": "4"}\n'
                 '{"id": "a", "question": "3+3", "answer": "6"}\n')
    with pytest.raises(ValueError, match=r"example id 'a' is used twice \(examples 1 and 3"):
        load_dataset_spec({"type": "jsonl", "path": str(f), "prompt_field": "question", "id_field": "id"})
