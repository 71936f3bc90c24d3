"""presample + ReferenceStore: manifest, split, stored log-probs, compatibility checks."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from conftest import TOY_MODEL_NAME, base_cfg, make_store, toy_examples, toy_first_char

from dphrl.batching import pack, response_logprobs
from dphrl.data.chat import encode_prompt
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.fsutil import sha256_file
from dphrl.models import tokenizer_hash, weights_fingerprint
from dphrl.reference import ReferenceStore, StoreMismatchError, dataset_hash
from dphrl.testing import tiny_causal_lm
from dphrl.trainer import Trainer

TEMP = 0.7


def _examples():
    # 2 always-right prompts (pass rate 1 -> D_pef), 3 sometimes right, 3 never right (answer not in vocab)
    exs = toy_examples(5, always=2) + toy_examples(3, answer="x", prefix="never")
    return exs


@pytest.fixture(scope="module")
def store(tmp_path_factory, tok):
    model = tiny_causal_lm(tok, hidden=32, layers=2, heads=4, seed=0).eval()
    exs = _examples()
    path = tmp_path_factory.mktemp("store") / "ref"
    manifest = make_store(path, model, tok, exs, n=8, temperature=TEMP, threshold=0.25, seed=5)
    return path, manifest, model, exs


def test_manifest_and_files(store, tok):
    path, manifest, _, exs = store
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "prompts.parquet", "samples.parquet"]
    assert manifest["store_version"] == 2 and manifest["dtype"] == "float32"
    assert manifest["model_fingerprint"] == weights_fingerprint(
        tiny_causal_lm(tok, hidden=32, layers=2, heads=4, seed=0)
    )
    assert manifest["files"] == {n: sha256_file(path / n) for n in ("prompts.parquet", "samples.parquet")}
    assert not list(path.parent.glob("*.tmp*")), "temp dir left behind"
    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["model"] == TOY_MODEL_NAME
    assert manifest["tokenizer_hash"] == tokenizer_hash(tok)
    assert manifest["sampling"] == {
        "n": 8,
        "temperature": TEMP,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": 3,
    }
    assert manifest["seed"] == 5 and manifest["threshold"] == 0.25
    assert manifest["dataset_hash"] == dataset_hash(exs)
    prompts = pq.read_table(path / "prompts.parquet").to_pylist()
    samples = pq.read_table(path / "samples.parquet").to_pylist()
    c = manifest["counts"]
    assert c["prompts"] == len(prompts) == len(exs)
    assert c["d_pef"] == sum(r["split"] == "pef" for r in prompts)
    assert c["d_exp"] == sum(r["split"] == "exp" for r in prompts)
    assert c["stored_samples"] == len(samples)
    assert c["reward_failures"] == 0 and c["reward_timeouts"] == 0


def test_split_by_threshold_and_stored_samples(store, tok):
    path, manifest, _, exs = store
    by_id = {ex.id: ex for ex in exs}
    prompts = {r["prompt_id"]: r for r in pq.read_table(path / "prompts.parquet").to_pylist()}
    samples = pq.read_table(path / "samples.parquet").to_pylist()
    for r in prompts.values():
        assert r["n_sampled"] == 8
        assert r["pass_rate"] == r["n_correct"] / 8
        assert r["split"] == ("pef" if r["pass_rate"] >= 0.25 else "exp")
    # always-right prompts are perfect (pass rate 1), never-right ones are exploration prompts
    assert all(prompts[f"p{i}"]["pass_rate"] == 1.0 and prompts[f"p{i}"]["split"] == "pef" for i in range(2))
    assert all(
        prompts[f"never{i}"]["n_correct"] == 0 and prompts[f"never{i}"]["split"] == "exp" for i in range(3)
    )
    # only correct responses of D_pef prompts are stored, all of them (keep_per_prompt=0)
    for pid, r in prompts.items():
        mine = [s for s in samples if s["prompt_id"] == pid]
        assert len(mine) == (r["n_correct"] if r["split"] == "pef" else 0)
    for s in samples:
        ex = by_id[s["prompt_id"]]
        assert toy_first_char(s["text"], ex) == 1.0
        assert s["prompt_ids"] == encode_prompt(tok, ex.prompt)
        assert len(s["ref_logprobs"]) == len(s["response_ids"]) >= 1
        assert s["finished"] == (s["response_ids"][-1] == tok.eos_token_id)
    st = ReferenceStore(path)
    assert set(st.pef_ids) == {p for p, r in prompts.items() if r["split"] == "pef"}
    assert set(st.exp_ids) == {p for p, r in prompts.items() if r["split"] == "exp"}
    assert sum(len(v) for v in st.samples.values()) == len(samples)


def pad_like(samples, T):
    out = torch.zeros(len(samples), T)
    for i, s in enumerate(samples):
        out[i, : len(s.ref_logprobs)] = torch.tensor(s.ref_logprobs)
    return out


def test_stored_logprobs_equal_fresh_forward(store, tok):
    path, _, model, _ = store
    st = ReferenceStore(path)
    samples = [s for v in st.samples.values() for s in v]
    assert len(samples) >= 4
    batch = pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], tok.pad_token_id)
    with torch.no_grad():
        lp, _ = response_logprobs(model, batch, TEMP)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        torch.testing.assert_close(lp[i, :n], torch.tensor(s.ref_logprobs), atol=1e-5, rtol=0)
    # at another temperature they would not match: the check above has teeth
    with torch.no_grad():
        lp1, _ = response_logprobs(model, batch, 1.0)
    assert (lp1 * batch.resp_mask - pad_like(samples, lp1.shape[1])).abs().max() > 1e-3


def _dph_cfg(tmp_path, path, **kw):
    kw.setdefault("temperature", TEMP)
    return base_cfg(tmp_path, "dph", reference_store=str(path), **kw)


def test_trainer_accepts_matching_store(store, tok, tmp_path):
    path, _, model, exs = store
    t = Trainer(
        _dph_cfg(tmp_path, path),
        model=tiny_causal_lm(tok, hidden=32, layers=2, seed=0),
        tokenizer=tok,
        examples=exs,
    )
    st = ReferenceStore(path)
    assert {ex.id for ex in t.rollout_examples} == set(st.exp_ids)
    assert t.pef_ids == st.pef_ids and t.ref_prompts_per_step >= 1


FIELDS = {
    "tokenizer": "field 'tokenizer_hash'",
    "temperature": "field 'sampling.temperature'",
    "top_p": "field 'sampling.top_p'",
    "dataset": "field 'dataset_hash'",
    "model": "field 'model_fingerprint'",
}


@pytest.mark.parametrize("what", list(FIELDS))
def test_trainer_refuses_mismatching_store(store, tok, tmp_path, what):
    path, _, _, exs = store
    kw, tokenizer, examples, seed = {}, tok, exs, 0
    if what == "tokenizer":
        tokenizer = build_char_tokenizer("0123456789+-")
    elif what == "temperature":
        kw["temperature"] = 1.0
    elif what == "top_p":
        kw["top_p"] = 0.9
    elif what == "dataset":
        examples = exs[:-1]
    else:
        seed = 1  # other weights under the same name
    model = tiny_causal_lm(tokenizer, hidden=32, layers=2, seed=seed)
    with pytest.raises(StoreMismatchError) as e:
        Trainer(_dph_cfg(tmp_path, path, **kw), model=model, tokenizer=tokenizer, examples=examples)
    msg = str(e.value)
    assert FIELDS[what] in msg and "presample" in msg
    # only what differs is reported (another tokenizer also means other embedding weights)
    reported = {k for k, f in FIELDS.items() if f in msg}
    assert reported == ({what, "model"} if what == "tokenizer" else {what}), msg


def test_model_identity_is_the_weights_not_the_path(store, tok, tmp_path):
    """The same weights under another name (absolute path from elsewhere, a copy) are accepted."""
    path, _, _, exs = store
    cfg = _dph_cfg(tmp_path, path, model="/somewhere/else/the-same-model")
    t = Trainer(cfg, model=tiny_causal_lm(tok, hidden=32, layers=2, seed=0), tokenizer=tok, examples=exs)
    assert t.store_check["store_check/tokens"] >= 8 and t.store_check["store_check/mean_abs_diff"] < 1e-5


def test_missing_store_is_a_clear_error(tok, tmp_path):
    cfg = _dph_cfg(tmp_path, tmp_path / "no_such_store")
    with pytest.raises(FileNotFoundError) as e:
        Trainer(cfg, model=tiny_causal_lm(tok, hidden=32, layers=2), tokenizer=tok, examples=_examples())
    assert "dphrl presample" in str(e.value) and "no_such_store" in str(e.value)
