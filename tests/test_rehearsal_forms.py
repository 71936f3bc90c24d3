"""The full-distribution rehearsal forms end to end: top-k stored at presample, used by the trainer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import base_cfg, toy_examples, toy_first_char

from dphrl import divergences
from dphrl.batching import pack, response_logits
from dphrl.engines.hf import HFEngine
from dphrl.models import tokenizer_hash
from dphrl.reference import ReferenceStore, StoreMismatchError, presample
from dphrl.testing import tiny_causal_lm
from dphrl.trainer import Trainer
from dphrl.update import topk_tensors as _topk_tensors

TEMP = 0.8


def _model(tok, seed=0):
    return tiny_causal_lm(tok, hidden=32, layers=2, heads=4, seed=seed)


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory, tok):
    exs = toy_examples(8, always=4)
    path = tmp_path_factory.mktemp("tk") / "store"
    presample(HFEngine(_model(tok), tok), tok, exs, toy_first_char, path, model_name="tiny", n=4,
              tokenizer_hash=tokenizer_hash(tok), temperature=TEMP, max_new_tokens=4, topk=8, progress=False,
              reward_workers=0)
    return path, exs


def test_presample_stores_the_reference_topk(topk_store, tok):
    path, _ = topk_store
    store = ReferenceStore(path)
    assert store.topk == 8 and store.manifest["rehearsal_topk"] == 8
    samples = [s for v in store.samples.values() for s in v]
    batch = pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], tok.pad_token_id)
    with torch.no_grad():
        ids, ref_b = divergences.reference_topk(response_logits(_model(tok), batch, TEMP), 8)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        assert s.topk_ids == ids[i, :n].tolist()
        torch.testing.assert_close(torch.tensor(s.topk_logprobs), ref_b[i, :n].float(), atol=1e-6, rtol=0)
        # sorted by probability, and buckets form a distribution
        lp = torch.tensor(s.topk_logprobs)  # (n, K+1)
        assert (lp[:, :-2] >= lp[:, 1:-1]).all()
        torch.testing.assert_close(torch.logsumexp(lp, -1), torch.zeros(n), atol=1e-5, rtol=0)


def test_a_smaller_k_merges_the_dropped_ids_into_the_tail(topk_store):
    path, _ = topk_store
    s = next(iter(ReferenceStore(path).samples.values()))[0]
    from dphrl.trainer import Seq

    seq = Seq(
        s.prompt_ids, s.response_ids, ref_logp=s.ref_logprobs, topk_ids=s.topk_ids, topk_logp=s.topk_logprobs
    )
    ids, ref = _topk_tensors([seq], len(s.response_ids) + 2, 3)  # 2 padding positions
    n = len(s.response_ids)
    assert ids[0, :n].tolist() == [row[:3] for row in s.topk_ids]
    full = torch.tensor(s.topk_logprobs)
    torch.testing.assert_close(ref[0, :n, :3], full[:, :3])
    torch.testing.assert_close(ref[0, :n, 3], torch.logsumexp(full[:, 3:], -1))
    torch.testing.assert_close(torch.logsumexp(ref[0], -1), torch.zeros(n + 2), atol=1e-6, rtol=0)
    assert ids[0, n:].tolist() == [[0, 1, 2]] * 2  # distinct ids on padding


@pytest.mark.parametrize("form", ["topk", "topk_sampled_tail"])
def test_trainer_term_equals_the_pure_function(topk_store, tok, tmp_path, form):
    path, exs = topk_store
    cfg = base_cfg(tmp_path, "dph", reference_store=str(path), temperature=TEMP, rehearsal_form=form,
                   rehearsal_topk=5, divergence="forward_kl", eta=0.7, max_steps=2)
    t = Trainer(cfg, model=_model(tok), tokenizer=tok, examples=exs)
    refs = t.reference_batch()
    assert refs and all(r.topk_ids is not None for r in refs)
    batch = pack([s.prompt_ids for s in refs], [s.response_ids for s in refs], tok.pad_token_id)
    n_tok = float(batch.resp_mask.sum())
    loss, m = t.updater.reference_loss(batch, refs, n_tok)
    logits = response_logits(t.model, batch, TEMP)  # (B, T, V)
    ids, ref_b = _topk_tensors(refs, batch.resp_ids.shape[1], 5)
    logp_b = divergences.topk_buckets(logits, ids)
    kw = {}
    if form == "topk_sampled_tail":
        tok_lp = torch.log_softmax(logits, -1).gather(-1, batch.resp_ids.unsqueeze(-1)).squeeze(-1)
        kw = dict(
            tok_logp=tok_lp,
            tok_ref_logp=torch.stack(
                [torch.tensor(r.ref_logp + [0.0] * (ids.shape[1] - len(r.ref_logp))) for r in refs]
            ),
            tok_in_topk=(ids == batch.resp_ids.unsqueeze(-1)).any(-1),
        )
    want, _ = divergences.REHEARSAL_FORMS[form].loss(
        "forward_kl", logp_b, ref_b, batch.resp_mask, agg="token-mean", num_tokens=n_tok, **kw
    )
    torch.testing.assert_close(loss, 0.7 * want)
    assert math.isfinite(m["div/value"])
    last = t.train()
    assert math.isfinite(last["div/value"]) and last["ref/sequences"] >= 1


def test_with_k_equal_vocab_the_bucket_form_is_the_exact_kl(tmp_path, tok):
    """K = V: the topk form is the exact per-position KL(pi_ref || pi_theta); the hybrid equals it."""
    exs = toy_examples(6, always=3)
    path = tmp_path / "full"
    V = len(tok)
    presample(HFEngine(_model(tok), tok), tok, exs, toy_first_char, path, model_name="tiny", n=2,
              tokenizer_hash=tokenizer_hash(tok), temperature=1.0, max_new_tokens=3, topk=V, progress=False,
              reward_workers=0)
    cfg = base_cfg(tmp_path, "dph", reference_store=str(path), rehearsal_form="topk", rehearsal_topk=V,
                   divergence="forward_kl", eta=1.0)
    t = Trainer(cfg, model=_model(tok), tokenizer=tok, examples=exs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy moves away from the reference
        for p in t._unwrapped().parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    policy = t._unwrapped()
    from dphrl.trainer import Seq

    seqs = [
        Seq(
            r.prompt_ids,
            r.response_ids,
            ref_logp=r.ref_logprobs,
            topk_ids=r.topk_ids,
            topk_logp=r.topk_logprobs,
        )
        for v in t.store.samples.values()
        for r in v
    ]
    batch = pack([s.prompt_ids for s in seqs], [s.response_ids for s in seqs], tok.pad_token_id)
    vals = {}
    for form in ("topk", "topk_sampled_tail"):
        t.cfg.rehearsal_form = form
        vals[form] = t.updater.reference_loss(batch, seqs, float(batch.resp_mask.sum()))[0].item()
    ref_model = _model(tok)
    with torch.no_grad():
        lq = torch.log_softmax(response_logits(ref_model, batch, 1.0), -1)  # (B, T, V)
        lp = torch.log_softmax(response_logits(policy, batch, 1.0), -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)  # (B, T) exact KL(pi_ref || pi_theta) per position
    exact = float((kl * batch.resp_mask).sum() / batch.resp_mask.sum())
    assert exact > 0.01  # the policy really differs from the reference
    assert vals["topk"] == pytest.approx(exact, rel=1e-4, abs=1e-6)
    assert vals["topk_sampled_tail"] == pytest.approx(exact, rel=1e-4, abs=1e-6)


def test_a_store_without_topk_is_refused_for_the_topk_forms(tmp_path, tok):
    from conftest import make_store

    exs = toy_examples(6, always=3)
    make_store(tmp_path / "plain", _model(tok), tok, exs, n=2)
    cfg = base_cfg(
        tmp_path, "dph", reference_store=str(tmp_path / "plain"), rehearsal_form="topk", rehearsal_topk=4
    )
    with pytest.raises(StoreMismatchError, match="field 'rehearsal_topk' is 0"):
        Trainer(cfg, model=_model(tok), tokenizer=tok, examples=exs)
