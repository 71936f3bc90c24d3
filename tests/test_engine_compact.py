"""hf-compact: decoding that drops ended rows samples what ``hf`` samples, with exact log-probs, and
forwards only the rows still decoding."""

from pathlib import Path

import torch
from test_engine import _reference_logprobs

from dphrl.data.chat import encode_prompt
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.engines import ENGINES, build_engine, engine_capabilities
from dphrl.engines.compact import CompactHFEngine
from dphrl.engines.hf import HFEngine
from dphrl.testing import tiny_causal_lm

TOK = build_char_tokenizer("0123456789+")
PROMPTS = [encode_prompt(TOK, [{"role": "user", "content": c}]) for c in ("1+2", "11+22", "3", "9+9+9", "45")]


def _model():
    model = tiny_causal_lm(TOK, hidden=32, layers=2, seed=1).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6)  # sharper distributions: top-p actually truncates
    return model


def _eos_after(model, token: str, bonus: float, position: int = -1):
    """Hooks: the EOS logit gets ``bonus`` at every position whose input token is ``token`` or whose
    position id is ``position`` (prompts differ in length, so greedy decoding ends at a prompt-dependent
    step) and 1.5 elsewhere (so sampled lengths vary)."""
    tid = TOK.convert_tokens_to_ids(token)
    last: dict[str, torch.Tensor] = {}

    def pre(mod, args, kwargs):
        last["ids"], last["pos"] = kwargs["input_ids"], kwargs["position_ids"]

    def post(mod, args, out):
        hit = (last["ids"] == tid) | (last["pos"] == position)  # (B, L)
        add = torch.where(hit, bonus, 1.5).to(out.dtype)  # (B, L)
        out = out.clone()
        out[..., TOK.eos_token_id] += add[:, -out.shape[1]:]
        return out

    return [model.register_forward_pre_hook(pre, with_kwargs=True), model.lm_head.register_forward_hook(post)]


def _flat(gens):
    return [g for gs in gens for g in gs]


def test_registered_with_the_capabilities_of_hf():
    assert "hf-compact" in ENGINES.names()
    assert engine_capabilities("hf-compact") == engine_capabilities("hf")
    assert isinstance(build_engine("hf-compact", _model(), TOK), CompactHFEngine)


def test_greedy_gives_the_tokens_and_logprobs_of_hf_with_rows_ending_at_different_steps():
    model = _model()
    hooks = _eos_after(model, "7", 100.0, position=16)
    try:
        for share in (True, False):
            kw = dict(max_new_tokens=24, greedy=True)
            a = _flat(HFEngine(model, TOK, share_prefix=share).generate(PROMPTS, 2, **kw))
            b = _flat(CompactHFEngine(model, TOK, share_prefix=share).generate(PROMPTS, 2, **kw))
            lengths = {len(g.response_ids) for g in a}
            assert len(lengths) > 1  # rows end at different steps: compaction happens
            for x, y in zip(a, b):
                assert x.response_ids == y.response_ids and x.finished == y.finished and x.text == y.text
                assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)
    finally:
        for h in hooks:
            h.remove()


def test_sampled_logprobs_are_those_of_the_full_forward_and_only_live_rows_are_forwarded():
    model = _model()
    hooks = _eos_after(model, "7", 4.0)
    rows_forwarded: list[int] = []
    spy = model.register_forward_pre_hook(
        lambda m, a, kw: (rows_forwarded.append(kw["input_ids"].shape[0])
                          if kw["input_ids"].shape[1] == 1 else None),
        with_kwargs=True)
    try:
        for share, (temperature, top_p) in [(True, (1.0, 1.0)), (False, (0.7, 0.9)), (True, (1.3, 0.8))]:
            rows_forwarded.clear()
            engine = CompactHFEngine(model, TOK, batch_size=7, share_prefix=share)  # batches of 7 and 3
            gens = _flat(engine.generate(PROMPTS, 2, max_new_tokens=20, temperature=temperature, top_p=top_p,
                                         seed=0))
            lengths = [len(g.response_ids) for g in gens]
            assert len(set(lengths)) > 2 and any(g.finished for g in gens) and max(lengths) <= 20
            for g in gens:  # EOS ends a finished response and appears nowhere else
                assert (TOK.eos_token_id in g.response_ids) == g.finished
                assert TOK.eos_token_id not in g.response_ids[:-1]
            # decoding forwards one row per live response and step: sum over batches of (length - 1)
            # single-token steps (the first token comes from the prompt forward), not batch x longest
            first = 7 + 3 if share else 0  # the shared prefill's last prompt column is a 1-token forward too
            assert sum(rows_forwarded) == first + sum(n - 1 for n in lengths)
            ref = _reference_logprobs(model, TOK, gens, temperature, top_p)
            for g, r in zip(gens, ref):
                assert torch.allclose(torch.tensor(g.logprobs), r, atol=1e-4), (share, temperature, top_p)
    finally:
        spy.remove()
        for h in hooks:
            h.remove()


def test_same_seed_same_samples():
    model = _model()
    hooks = _eos_after(model, "7", 4.0)
    try:
        kw = dict(max_new_tokens=16, temperature=0.9, seed=5)
        a = _flat(CompactHFEngine(model, TOK).generate(PROMPTS, 3, **kw))
        b = _flat(CompactHFEngine(model, TOK).generate(PROMPTS, 3, **kw))
        assert [g.response_ids for g in a] == [g.response_ids for g in b]
        c = _flat(CompactHFEngine(model, TOK).generate(PROMPTS, 3, **{**kw, "seed": 6}))
        assert [g.response_ids for g in a] != [g.response_ids for g in c]
    finally:
        for h_ in hooks:
            h_.remove()


def test_inverse_cdf_sampler_draws_each_rows_distribution_and_never_a_zero():
    """Chi-square against the exact probabilities of two rows (one with zeros, as top-p leaves them)."""
    from test_sampling_exact import gof_pvalue

    from dphrl.engines.compact import sample_categorical

    p = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.05, 0.05, 0.1, 0.0, 0.8]])  # (2, 5)
    torch.manual_seed(0)
    n = 20000
    draws = torch.stack([sample_categorical(p) for _ in range(n)])  # (n, 2)
    for row in range(2):
        assert gof_pvalue(draws[:, row], p[row].expand(n, 5)) > 1e-3  # 0 if a zero was ever drawn
    # unnormalized rows (a softmax's float sum) and a one-hot row
    q = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1e-3]])
    assert sample_categorical(q).tolist() == [0, 2]



def test_training_with_hf_compact_uses_its_exact_logprobs_as_pi_old(tmp_path, tok, make_model):
    """``engine: hf-compact`` trains like ``hf``: the policy module itself generates (no copy, no weight
    push), its log-probs are pi_old (no recompute forward), and the run records the engine."""
    import json

    from conftest import base_cfg, toy_examples

    from dphrl.trainer import Trainer

    cfg = base_cfg(tmp_path, "grpo", engine="hf-compact", max_steps=2, max_new_tokens=6)
    assert cfg.old_logprob == "rollout"
    t = Trainer(cfg, model=make_model(), tokenizer=tok, examples=toy_examples(8))
    assert isinstance(t.engine, CompactHFEngine) and t.engine.model is t._unwrapped()
    t.train()
    out = Path(cfg.output_dir)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    assert "hf-compact" in (out / "run_info.json").read_text()
