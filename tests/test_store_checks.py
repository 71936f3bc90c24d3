"""The reference store is checked, not trusted: checksums, impossible values, re-scoring at start-up,
the prompt-length rule, and crash-safe replacement."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import base_cfg, make_store, toy_examples

from dphrl.fsutil import recover_dir, remove_dir, replace_dir, sha256_file
from dphrl.reference import (
    STORE_TOLERANCE,
    ReferenceStore,
    StoreCorruptError,
    StoreMismatchError,
    store_tolerance,
)
from dphrl.testing import tiny_causal_lm
from dphrl.trainer import Trainer


def _model(tok, seed=0):
    return tiny_causal_lm(tok, hidden=32, layers=2, heads=4, seed=seed)


@pytest.fixture
def fresh_store(tmp_path, tok):
    """A small valid store (copied per test: tests damage it)."""
    exs = toy_examples(6, always=3)
    path = tmp_path / "store"
    make_store(path, _model(tok), tok, exs, n=4)
    return path, exs


def _rewrite_samples(path, fn):
    """Apply ``fn`` to every sample row, rewrite the parquet and re-sign the manifest (a consistent store)."""
    f = path / "samples.parquet"
    table = pq.read_table(f)
    rows = [fn(r) for r in table.to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), f)
    m = json.loads((path / "manifest.json").read_text())
    m["files"]["samples.parquet"] = sha256_file(f)
    (path / "manifest.json").write_text(json.dumps(m))


def _dph(tmp_path, path, **kw):
    return base_cfg(tmp_path, "dph", reference_store=str(path), **kw)


def test_flipped_bytes_are_refused_naming_the_file(fresh_store):
    path, _ = fresh_store
    f = path / "samples.parquet"
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    f.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"samples\.parquet: checksum .*dphrl presample"):
        ReferenceStore(path)


def test_truncated_or_missing_files_are_refused(fresh_store):
    path, _ = fresh_store
    f = path / "prompts.parquet"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(StoreCorruptError, match=r"prompts\.parquet: checksum"):
        ReferenceStore(path)
    f.unlink()
    with pytest.raises(StoreCorruptError, match=r"prompts\.parquet: missing"):
        ReferenceStore(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match="not valid JSON"):
        ReferenceStore(path)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), 0.5, -9.4e20])
def test_impossible_logprobs_are_refused_even_with_a_valid_checksum(fresh_store, bad):
    path, _ = fresh_store
    _rewrite_samples(path, lambda r: {**r, "ref_logprobs": [bad] + r["ref_logprobs"][1:]})
    with pytest.raises(StoreCorruptError, match="impossible log-probs"):
        ReferenceStore(path)


def test_logprob_count_must_match_the_response(fresh_store):
    path, _ = fresh_store
    _rewrite_samples(path, lambda r: {**r, "ref_logprobs": r["ref_logprobs"] + [-1.0]})
    with pytest.raises(StoreCorruptError, match="log-probs for"):
        ReferenceStore(path)


def test_an_old_store_version_is_refused_naming_the_field(fresh_store):
    path, _ = fresh_store
    m = json.loads((path / "manifest.json").read_text())
    m["store_version"] = 1
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreMismatchError, match="field 'store_version' is 1"):
        ReferenceStore(path)


def test_plausible_but_wrong_logprobs_are_caught_by_rescoring(fresh_store, tmp_path, tok):
    """Finite, <= 0, checksummed, same fingerprint: only re-scoring with the model can tell."""
    path, exs = fresh_store
    _rewrite_samples(path, lambda r: {**r, "ref_logprobs": [x - 0.2 for x in r["ref_logprobs"]]})
    with pytest.raises(StoreMismatchError, match=r"mean \|delta\| 0\.2.*tolerance 0\.001"):
        Trainer(_dph(tmp_path, path), model=_model(tok), tokenizer=tok, examples=exs)
    # the tolerance is a config key, and 0 tokens skips the check
    t = Trainer(
        _dph(tmp_path, path, store_check_tolerance=0.3), model=_model(tok), tokenizer=tok, examples=exs
    )
    assert t.store_check["store_check/mean_abs_diff"] == pytest.approx(0.2, abs=1e-5)
    t = Trainer(_dph(tmp_path, path, store_check_tokens=0), model=_model(tok), tokenizer=tok, examples=exs)
    assert t.store_check == {}


def test_a_top_p_store_is_rescored_over_the_nucleus(tmp_path, tok):
    """Stored log-probs of a top-p store are renormalized over the nucleus; the check does the same."""
    from dphrl.engines.hf import HFEngine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import presample

    exs = toy_examples(6, always=3)
    model = _model(tok)
    path = tmp_path / "store_p"
    presample(HFEngine(model, tok), tok, exs, lambda r, e: 1.0 if e.answer == "always" else 0.0, path,
              model_name="tiny-toy", tokenizer_hash=tokenizer_hash(tok), n=4, top_p=0.7, max_new_tokens=3,
              progress=False)
    t = Trainer(_dph(tmp_path, path, top_p=0.7), model=_model(tok), tokenizer=tok, examples=exs)
    assert t.store_check["store_check/mean_abs_diff"] < 1e-5
    t = Trainer(
        _dph(tmp_path, path, top_p=0.7, store_check_tokens=0), model=_model(tok), tokenizer=tok, examples=exs
    )
    samples = t.store.rescoring_sample(64)
    full = t.updater.no_grad_logprobs(
        t.model,
        [type("S", (), {"prompt_ids": s.prompt_ids, "response_ids": s.response_ids}) for s in samples],
    )
    gap = max(abs(a - b) for s, f in zip(samples, full) for a, b in zip(s.ref_logprobs, f))
    assert gap > 1e-3  # without the nucleus the stored values would not match: the check has teeth


def test_tolerance_is_dtype_aware():
    assert store_tolerance("float32", "float32") == STORE_TOLERANCE["float32"] == 1e-3
    assert store_tolerance("float32", "bfloat16") == store_tolerance("bfloat16", "float32") == 5e-2


def test_reference_prompts_follow_max_prompt_tokens(tmp_path, tok):
    exs = toy_examples(12, always=12)  # every prompt in D_pef; prompts of i >= 10 are 7 tokens, else 5
    path = tmp_path / "store_len"
    make_store(path, _model(tok), tok, exs, n=2)
    store = ReferenceStore(path, max_prompt_tokens=5)
    assert store.dropped_long_prompts == 4  # 2 prompts x 2 stored samples
    assert sorted(store.pef_ids) == sorted(f"p{i}" for i in range(10))


def test_d_pef_prompts_are_never_drawn_twice_in_a_step(tmp_path, tok):
    exs = toy_examples(8, always=3)
    path = tmp_path / "store_few"
    make_store(path, _model(tok), tok, exs, n=2)
    t = Trainer(_dph(tmp_path, path, ref_prompts_per_step=10), model=_model(tok), tokenizer=tok, examples=exs)
    assert t.ref_prompts_per_step == len(t.pef_ids) == 3
    for _ in range(4):  # across epochs of the D_pef sampler
        refs = t.reference_batch()
        prompts = [r.prompt_ids for r in refs]
        assert len({tuple(p) for p in prompts}) == 3
    from dphrl.trainer import PromptSampler

    for n, k in ((3, 2), (5, 3), (7, 7), (4, 1)):  # k not dividing n: every call crosses epochs at some point
        s = PromptSampler(n, seed=n + k)
        draws = [s.next(k) for _ in range(12)]
        assert all(len(set(d)) == k for d in draws), draws
        state = s.state_dict()
        s2 = PromptSampler(n, seed=n + k)
        s2.load_state_dict(state)  # resume reproduces the (reordered) permutation
        assert [s2.next(k) for _ in range(5)] == [s.next(k) for _ in range(5)]


def test_replace_dir_never_leaves_neither(tmp_path):
    dst, tmp = tmp_path / "d", tmp_path / "d.tmp"
    dst.mkdir()
    (dst / "v").write_text("old")
    tmp.mkdir()
    (tmp / "v").write_text("new")
    replace_dir(tmp, dst)
    assert (dst / "v").read_text() == "new" and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    # an interrupted fallback swap (old renamed aside, new not yet in place) is recovered
    aside = tmp_path / "d.old-123"
    shutil.move(str(dst), str(aside))
    assert recover_dir(dst) and (dst / "v").read_text() == "new"
    remove_dir(dst)
    assert list(tmp_path.iterdir()) == []


def test_weights_fingerprint_big_tensors_dtypes_and_changes():
    from dphrl.models import weights_fingerprint

    big = torch.nn.Linear(4100, 4100, bias=False)  # 16.8M weights: past float32's exact integers
    fp = weights_fingerprint(big)
    assert weights_fingerprint(big.to(torch.bfloat16).float()) == weights_fingerprint(big.to(torch.bfloat16))
    with torch.no_grad():
        big.weight[-1, -1] += 1.0  # the last element is always sampled
    assert weights_fingerprint(big) != fp
    with torch.no_grad():
        big.weight.mul_(1.01)  # a fine-tune moves (almost) every weight
    assert len({fp, weights_fingerprint(big)}) == 2
