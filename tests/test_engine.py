"""HFEngine: log-probs are those of the exact distribution sampled from (temperature, top-p renormalized)."""

import torch

from dphrl.batching import pack
from dphrl.data.chat import encode_prompt
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.engines.hf import HFEngine
from dphrl.testing import tiny_causal_lm


def _setup():
    tok = build_char_tokenizer("0123456789+")
    model = tiny_causal_lm(tok, hidden=32, layers=2, seed=1).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6)  # sharper distributions: top-p actually truncates
    prompts = [encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("1+2", "11+22")]
    return tok, model, prompts


def _reference_logprobs(model, tok, gens, temperature: float, top_p: float) -> list[torch.Tensor]:
    """Independent computation: full forward, logits / T, nucleus mask, renormalize, gather."""
    b = pack([g.prompt_ids for g in gens], [g.response_ids for g in gens], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    logits = logits[:, b.prompt_len - 1 : -1].float() / temperature  # (B, T, V)
    if top_p < 1.0:
        probs = torch.softmax(logits, -1)
        sp, idx = probs.sort(-1, descending=True)
        drop_sorted = (sp.cumsum(-1) - sp) >= top_p  # tokens after the nucleus is full
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    lp = torch.log_softmax(logits, -1).gather(-1, b.resp_ids.unsqueeze(-1)).squeeze(-1)
    return [lp[i, : len(g.response_ids)] for i, g in enumerate(gens)]


def test_logprobs_match_the_sampled_distribution():
    tok, model, prompts = _setup()
    engine = HFEngine(model, tok, batch_size=3)  # several generate batches
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (1.3, 0.9)]:
        gens = [g for gs in engine.generate(prompts, 4, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=0)
                for g in gs]
        ref = _reference_logprobs(model, tok, gens, temperature, top_p)
        for g, r in zip(gens, ref):
            assert len(g.logprobs) == len(g.response_ids)
            assert torch.allclose(torch.tensor(g.logprobs), r, atol=1e-4), (temperature, top_p)
            assert torch.isfinite(torch.tensor(g.logprobs)).all()  # sampled tokens are inside the nucleus


def test_eos_is_kept_and_text_excludes_it():
    tok, model, prompts = _setup()
    gens = [g for gs in HFEngine(model, tok).generate(prompts, 8, max_new_tokens=12, seed=3) for g in gs]
    for g in gens:
        if g.finished:
            assert g.response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in g.response_ids[:-1]
        else:
            assert len(g.response_ids) == 12 and tok.eos_token_id not in g.response_ids
        assert "<|eos|>" not in g.text
    assert any(g.finished for g in gens) or all(len(g.response_ids) == 12 for g in gens)


def test_seeded_generation_is_reproducible_and_greedy_is_deterministic():
    tok, model, prompts = _setup()
    e = HFEngine(model, tok)
    a = e.generate(prompts, 3, max_new_tokens=8, seed=5)
    b = e.generate(prompts, 3, max_new_tokens=8, seed=5)
    assert [[g.response_ids for g in gs] for gs in a] == [[g.response_ids for g in gs] for gs in b]
    g1 = e.generate(prompts, 2, max_new_tokens=8, greedy=True)
    assert all(gs[0].response_ids == gs[1].response_ids for gs in g1)
