"""Forgetting as forward KL(pi_0 || pi_theta) on base-model samples (dphrl.evaluation.forgetting).

On an 8-token vocabulary with responses of at most 3 tokens every response can be enumerated
(400 per prompt, EOS termination and truncation included), so the exact per-token forward KL is
computed here by a plain full-softmax forward and the Monte-Carlo estimate must land within 3 standard
errors of it. The plumbing (padding, shared prefixes, micro-batching, LoRA wrappers) is checked exactly
on fixed sequences against the same plain forward; the base model scores 0 on its own set; stored log
pi_0 are the model's own at the sampling temperature; damaged or mismatched sets are refused.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dphrl.data.chat import encode_prompt
from dphrl.data.example import Example
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.evaluation.forgetting import (
    SAMPLES_FILE,
    ForgettingSet,
    forgetting,
    load_forgetting_set,
    sample_forgetting_set,
)
from dphrl.fsutil import sha256_file
from dphrl.models import tokenizer_hash, weights_fingerprint
from dphrl.reference import StoreCorruptError, StoreMismatchError
from dphrl.testing import tiny_causal_lm

SMALL = build_char_tokenizer("ab")  # 6 special tokens (pad 0, eos 1) + 2 characters = 8 ids
V, EOS = len(SMALL), SMALL.eos_token_id


def _examples(k: int = 2) -> list[Example]:
    return [Example(id=f"q{i}", prompt=[{"role": "user", "content": "ab" * (i + 1)}], task="none")
            for i in range(k)]


def _perturbed(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model``, Gaussian noise of std ``scale`` added to every weight (a 'trained' pi_theta)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


@pytest.fixture(scope="module")
def base():
    return tiny_causal_lm(SMALL, seed=0)


@pytest.fixture(scope="module")
def theta(base):
    return _perturbed(base, 0.1)


@torch.no_grad()
def plain_logprobs(model: torch.nn.Module, prompt: list[int], responses: list[list[int]], temperature: float
                   ) -> list[np.ndarray]:
    """log pi(y_t | x, y_<t) at ``temperature`` by an unpadded full forward of prompt + response and a
    full log-softmax (float64), one forward per response length (rows of one length share the prompt)."""
    model.eval()
    out: list[np.ndarray] = [np.empty(0)] * len(responses)
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(responses):
        by_len.setdefault(len(r), []).append(i)
    P = len(prompt)
    for L, ix in by_len.items():
        ids = torch.tensor([prompt + responses[i] for i in ix])  # (B, P + L)
        logits = model(input_ids=ids).logits.double() / temperature  # (B, P + L, V)
        logp = torch.log_softmax(logits[:, P - 1 : P + L - 1], dim=-1)  # (B, L, V)
        chosen = logp.gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)  # (B, L)
        for i, row in zip(ix, chosen.numpy()):
            out[i] = row
    return out


def all_responses(max_len: int) -> list[list[int]]:
    """Every response the sampler can return: non-EOS tokens, then EOS, or cut at ``max_len``."""
    others = [t for t in range(V) if t != EOS]
    out: list[list[int]] = []
    for L in range(max_len):
        out += [list(p) + [EOS] for p in itertools.product(others, repeat=L)]
    out += [list(p) for p in itertools.product(others, repeat=max_len)]
    return out


# -------------------------------------------------------------------------------------------------- (1)


def test_monte_carlo_converges_to_the_exact_forward_kl(tmp_path, base, theta):
    """Exact KL by enumerating all 400 responses per prompt vs forgetting() on 2 x 1500 samples."""
    T, max_new = 0.8, 3
    examples = _examples(2)
    ys = all_responses(max_new)
    assert len(ys) == 1 + 7 + 7 * 7 * 8
    seq_kl, exp_len = [], []
    for ex in examples:
        x = encode_prompt(SMALL, ex.prompt)
        lp0 = plain_logprobs(base, x, ys, T)
        lpt = plain_logprobs(theta, x, ys, T)
        p0 = np.exp([row.sum() for row in lp0])  # (400,) pi_0(y | x)
        assert p0.sum() == pytest.approx(1.0, abs=1e-9)  # the enumeration covers every response
        seq_kl.append(float(sum(p * (a - b).sum() for p, a, b in zip(p0, lp0, lpt))))
        exp_len.append(float(sum(p * len(y) for p, y in zip(p0, ys))))
    exact_tok = sum(seq_kl) / sum(exp_len)  # prompts weighted equally (n samples each)
    exact_seq = sum(seq_kl) / len(seq_kl)
    assert exact_tok > 0.02

    sample_forgetting_set(base, SMALL, examples, tmp_path / "fs", n=1500, temperature=T,
                          max_new_tokens=max_new, seed=3, batch_size=500)
    r = forgetting(theta, SMALL, load_forgetting_set(tmp_path / "fs"))
    se_tok, se_seq = r["forgetting/stderr_per_token"], r["forgetting/stderr_per_seq"]
    assert 0 < se_tok < 0.15 * exact_tok  # the test has power: the estimate is tight
    assert abs(r["forgetting/kl_per_token"] - exact_tok) < 3 * se_tok, (r, exact_tok)
    assert abs(r["forgetting/kl_per_seq"] - exact_seq) < 3 * se_seq, (r, exact_seq)
    assert r["forgetting/sequences"] == 3000 and r["forgetting/prompts"] == 2


def _fixed_set(base: torch.nn.Module, temperature: float) -> ForgettingSet:
    """Fixed sequences: three prompts of different lengths (left padding), responses of 1-5 tokens,
    EOS-ended or cut, a pad id (0) inside a response (padding is by position, never by id); log pi_0 by
    the plain forward."""
    prompts = [encode_prompt(SMALL, ex.prompt) for ex in _examples(3)]
    assert len({len(p) for p in prompts}) == 3
    rows = [(0, [6, 7, EOS]), (0, [7]), (0, [0, 6, 7, 7, 6]), (1, [EOS]), (1, [6, 0, EOS]), (1, [7, 7, 7, 7]),
            (2, [6, 6]), (2, [2, 3, 6, EOS]), (2, [6, 6])]
    ps = [prompts[g] for g, _ in rows]
    rs = [r for _, r in rows]
    lps = [plain_logprobs(base, p, [r], temperature)[0].astype(np.float32).tolist() for p, r in zip(ps, rs)]
    manifest = {"sampling": {"temperature": temperature, "top_p": 1.0, "n": 3},
                "tokenizer_hash": tokenizer_hash(SMALL), "micro_batch_size": 4}
    return ForgettingSet(manifest=manifest, prompt_ids=ps, response_ids=rs, logprobs=lps)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "packed"])
@pytest.mark.parametrize("micro", [2, 16])
def test_fixed_sequences_equal_the_hand_computed_mean(monkeypatch, base, theta, shared, micro):
    import dphrl.prefix

    if not shared:
        monkeypatch.setattr(dphrl.prefix, "can_share_prefix", lambda *a, **k: False)
    T = 0.7
    fset = _fixed_set(base, T)
    d = np.array([np.sum(np.asarray(lp0, dtype=np.float64) - plain_logprobs(theta, p, [r], T)[0])
                  for p, r, lp0 in zip(fset.prompt_ids, fset.response_ids, fset.logprobs)])  # (N,)
    lens = np.array([len(r) for r in fset.response_ids], dtype=np.float64)
    want_tok = d.sum() / lens.sum()
    want_se_tok = math.sqrt(((d - want_tok * lens) ** 2).sum() / (len(d) * (len(d) - 1))) / lens.mean()
    r = forgetting(theta, SMALL, fset, micro_batch_size=micro)
    assert r["forgetting/kl_per_token"] == pytest.approx(want_tok, abs=1e-6)
    assert r["forgetting/kl_per_seq"] == pytest.approx(d.mean(), abs=1e-6)
    assert r["forgetting/stderr_per_seq"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), abs=1e-6)
    assert r["forgetting/stderr_per_token"] == pytest.approx(want_se_tok, abs=1e-6)
    assert (r["forgetting/sequences"], r["forgetting/tokens"], r["forgetting/prompts"]) == (9, lens.sum(), 3)
    assert abs(want_tok) > 1e-3  # the perturbation is visible on these sequences
    # the base against its own (plain-forward) log-probs: 0 up to float summation order
    assert abs(forgetting(base, SMALL, fset, micro_batch_size=micro)["forgetting/kl_per_token"]) < 1e-6


def test_lora_wrapped_models_are_scored_through_the_adapter(base):
    from dphrl.models import apply_lora

    T = 0.7
    fset = _fixed_set(base, T)
    lora = apply_lora(copy.deepcopy(base), r=4, alpha=8)  # B = 0: the wrapped base itself
    assert abs(forgetting(lora, SMALL, fset)["forgetting/kl_per_token"]) < 1e-6
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    merged = copy.deepcopy(lora).merge_and_unload()
    got = forgetting(lora, SMALL, fset)["forgetting/kl_per_token"]
    assert got > 1e-3
    assert got == pytest.approx(forgetting(merged, SMALL, fset)["forgetting/kl_per_token"], abs=1e-5)


# -------------------------------------------------------------------------------------------------- (2), (3)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("forgetting") / "set"
    manifest = sample_forgetting_set(base, SMALL, _examples(3), out, n=16, temperature=0.7, max_new_tokens=6,
                                     seed=1, model_name="tiny-ab")
    return out, manifest


def test_manifest_records_what_was_sampled(sampled, base):
    out, m = sampled
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["model"] == "tiny-ab" and m["model_fingerprint"] == weights_fingerprint(base)
    assert m["tokenizer_hash"] == tokenizer_hash(SMALL)
    assert m["sampling"] == {"n": 16, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6}
    assert m["seed"] == 1 and m["dtype"] == "float32"
    fset = load_forgetting_set(out)
    assert m["counts"] == {"prompts": 3, "sequences": 48, "tokens": fset.num_tokens,
                           "finished": sum(r[-1] == EOS for r in fset.response_ids)}
    assert 0 < m["counts"]["finished"] < 48  # both EOS-ended and cut responses are stored
    assert m["logprob_check"]["max_abs_diff"] < 1e-5  # the engine's sampling log-probs = the stored forward's
    assert fset.prompt_keys == [f"q{i}" for i in range(3) for _ in range(16)]


def test_base_model_scores_zero_and_a_perturbed_one_more(sampled, base, theta):
    out, _ = sampled
    fset = load_forgetting_set(out)
    for micro in (None, 3, 64):  # the set's own micro-batching (bitwise 0) and others (summation order only)
        r = forgetting(base, SMALL, fset, micro_batch_size=micro)
        assert abs(r["forgetting/kl_per_token"]) < 1e-6 and abs(r["forgetting/kl_per_seq"]) < 1e-6
    r = forgetting(theta, SMALL, fset)
    assert r["forgetting/kl_per_token"] > 3 * r["forgetting/stderr_per_token"] > 0
    assert r["forgetting/kl_per_seq"] > 3 * r["forgetting/stderr_per_seq"] > 0
    far = forgetting(_perturbed(base, 0.3), SMALL, fset)  # further from the base: forgets more
    assert far["forgetting/kl_per_token"] > r["forgetting/kl_per_token"]


def test_stored_logprobs_are_the_models_own_at_the_sampling_temperature(sampled, base):
    out, _ = sampled
    fset = load_forgetting_set(out)
    worst = worst_t1 = 0.0
    for p, r, lp in zip(fset.prompt_ids, fset.response_ids, fset.logprobs):
        worst = max(worst, float(np.abs(np.asarray(lp) - plain_logprobs(base, p, [r], 0.7)[0]).max()))
        worst_t1 = max(worst_t1, float(np.abs(np.asarray(lp) - plain_logprobs(base, p, [r], 1.0)[0]).max()))
    assert worst < 1e-5
    assert worst_t1 > 1e-2  # temperature matters: at T=1 they would differ


def test_sampling_is_seeded_and_refuses_to_overwrite(tmp_path, base):
    ex = _examples(2)
    sample_forgetting_set(base, SMALL, ex, tmp_path / "a", n=4, max_new_tokens=4, seed=7)
    sample_forgetting_set(base, SMALL, ex, tmp_path / "b", n=4, max_new_tokens=4, seed=7)
    a, b = load_forgetting_set(tmp_path / "a"), load_forgetting_set(tmp_path / "b")
    assert a.response_ids == b.response_ids and a.logprobs == b.logprobs
    with pytest.raises(FileExistsError, match="already exists"):
        sample_forgetting_set(base, SMALL, ex, tmp_path / "a", n=4, max_new_tokens=4, seed=8)
    sample_forgetting_set(base, SMALL, ex, tmp_path / "a", n=2, max_new_tokens=4, seed=8, overwrite=True)
    assert len(load_forgetting_set(tmp_path / "a")) == 4
    with pytest.raises(ValueError, match="temperature"):
        sample_forgetting_set(base, SMALL, ex, tmp_path / "c", temperature=0.0)


# -------------------------------------------------------------------------------------------------- (4)


def _rewrite_samples(path, edit) -> None:
    """Apply ``edit(rows)`` to samples.parquet and re-sign it in the manifest (value checks are reached)."""
    f = path / SAMPLES_FILE
    table = pq.read_table(f)
    rows = table.to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), f)
    m = json.loads((path / "manifest.json").read_text())
    m["files"][SAMPLES_FILE] = sha256_file(f)
    (path / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _set(row: dict, key: str, value) -> None:
    row[key] = value


def _fill(row: dict, value: float) -> None:
    row["logprobs"] = [value] * len(row["response_ids"])


DAMAGES = {
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
    "manifest not json": (lambda p: (p / "manifest.json").write_text("{oops"), "not valid JSON"),
    "a reference store": (lambda p: _edit_manifest(p, lambda m: m.pop("format")), "field 'format'"),
    "other version": (lambda p: _edit_manifest(p, lambda m: _set(m, "format_version", 99)), "format_version"),
    "no samples": (lambda p: (p / SAMPLES_FILE).unlink(), "samples.parquet: missing"),
    "truncated": (lambda p: (p / SAMPLES_FILE).write_bytes((p / SAMPLES_FILE).read_bytes()[:100]),
                  "checksum"),
    "count mismatch": (lambda p: _edit_manifest(p, lambda m: _set(m["counts"], "tokens", 1)),
                       "response tokens"),
    "a row dropped": (lambda p: _rewrite_samples(p, lambda rows: rows.pop()), "sequences"),
    "positive log-prob": (lambda p: _rewrite_samples(p, lambda rows: _fill(rows[2], 0.5)),
                          "impossible log-probs"),
    "nan log-prob": (lambda p: _rewrite_samples(p, lambda rows: _fill(rows[0], float("nan"))),
                     "impossible log-probs"),
    "short log-prob row": (lambda p: _rewrite_samples(p, lambda rows: _set(rows[1], "logprobs", [])),
                           "one log-prob per response token"),
    "top_p < 1": (lambda p: _edit_manifest(p, lambda m: _set(m["sampling"], "top_p", 0.9)), "top_p"),
    "temperature 0": (lambda p: _edit_manifest(p, lambda m: _set(m["sampling"], "temperature", 0)),
                      "temperature"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_sets_are_refused_naming_the_file(tmp_path, base, damage):
    out = tmp_path / "set"
    sample_forgetting_set(base, SMALL, _examples(2), out, n=3, max_new_tokens=4)
    load_forgetting_set(out)  # intact: loads
    do, message = DAMAGES[damage]
    do(out)
    with pytest.raises(StoreCorruptError, match=message) as e:
        load_forgetting_set(out)
    assert str(out) in str(e.value) and "sample_forgetting_set" in str(e.value)


def test_mismatched_tokenizer_is_refused(sampled, base):
    out, _ = sampled
    fset = load_forgetting_set(out)
    other = build_char_tokenizer("ba")  # same size, other ids: the stored ids would mean other text
    with pytest.raises(StoreMismatchError, match="tokenizer_hash"):
        forgetting(base, other, fset)


def test_forgetting_timing_on_the_tiny_model(sampled, theta):
    """Not a benchmark: one pass over 48 sequences on one CPU thread stays well under a second."""
    fset = load_forgetting_set(sampled[0])
    t0 = time.perf_counter()
    forgetting(theta, SMALL, fset)
    assert time.perf_counter() - t0 < 5.0
