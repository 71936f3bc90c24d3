"""HFEngine: log-probs are those of the exact distribution sampled from (temperature, top-p renormalized);
the shared prompt prefill and the preallocated KV cache sample what plain ``generate`` samples."""

import pytest
import torch

from dphrl.batching import pack
from dphrl.data.chat import encode_prompt
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.engines.hf import PREALLOCATE_MIN_POSITIONS, HFEngine, _PreallocatedLayer
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
        logits = model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids
        ).logits
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
        gens = [
            g
            for gs in engine.generate(
                prompts, 4, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=0
            )
            for g in gs
        ]
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


# --------------------------------------------------------------------------------------------------
# shared prompt prefill (share_prefix, the default)


def _spy_forward(model: torch.nn.Module) -> list[dict]:
    """The keyword arguments of every forward call of ``model`` (+ the cache's length at the call)."""
    calls: list[dict] = []

    def hook(_m, _a, kw):
        cache = kw.get("cache")
        calls.append(dict(kw, cache_len=cache.get_seq_length() if cache is not None else 0))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _flat(gens):
    return [g for gs in gens for g in gs]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefill_samples_what_unshared_samples(arch):
    """Same seed: the same tokens, EOS and texts; log-probs equal up to float rounding (not bitwise:
    the last prompt column is forwarded apart from the rest, see engines/hf.py)."""
    tok = build_char_tokenizer("0123456789+")
    model = tiny_causal_lm(tok, arch=arch, hidden=32, layers=2, seed=1).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6)
    prompts = [
        encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("1+2", "11+22", "3", "123+456+78")
    ]
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(greedy=True)]
    n_tokens, finished = 0, []
    for batch_size in (64, 3):  # one batch; batches that cut groups (n = 4) and mix prompt lengths
        for kw in settings:
            a = _flat(
                HFEngine(model, tok, batch_size=batch_size).generate(
                    prompts, 4, max_new_tokens=12, seed=7, **kw
                )
            )
            b = _flat(HFEngine(model, tok, batch_size=batch_size, share_prefix=False).generate(
                prompts, 4, max_new_tokens=12, seed=7, **kw))
            assert [(g.prompt_ids, g.response_ids, g.finished, g.text) for g in a] == [
                (g.prompt_ids, g.response_ids, g.finished, g.text) for g in b]
            for x, y in zip(a, b):
                torch.testing.assert_close(
                    torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-6
                )
            n_tokens += sum(len(g.response_ids) for g in a)
            finished += [g.finished for g in a]
    # ended by EOS and cut at the limit both occur
    assert n_tokens > 200 and any(finished) and not all(finished)


def test_each_prompt_is_prefilled_once():
    tok, model, prompts = _setup()
    P = max(len(p) for p in prompts)
    calls = _spy_forward(model)
    HFEngine(model, tok).generate(prompts, 4, max_new_tokens=3, seed=0)
    prefill, first, *rest = calls
    assert prefill["input_ids"].shape == (2, P - 1)  # the 2 distinct prompts, all but the last column
    assert prefill["attention_mask"].tolist() == [
        [0] * (P - 1 - (len(p) - 1)) + [1] * (len(p) - 1) for p in prompts
    ]
    assert prefill["cache_len"] == 0 and first["cache_len"] == P - 1  # the prefill filled the cache ...
    assert first["input_ids"].shape == (8, 1)  # ... and generate forwards only the last prompt column
    assert first["position_ids"][:, -1].tolist() == [len(p) - 1 for p in prompts for _ in range(4)]
    assert len(rest) == 2 and all(c["input_ids"].shape == (8, 1) for c in rest)
    calls.clear()
    HFEngine(model, tok, share_prefix=False).generate(prompts, 4, max_new_tokens=3, seed=0)
    assert calls[0]["input_ids"].shape == (8, P)  # unshared: every copy forwards the whole prompt
    calls.clear()
    HFEngine(model, tok).generate(prompts, 1, max_new_tokens=3, seed=0)
    assert calls[0]["input_ids"].shape == (2, P)  # n = 1: nothing to share, no extra forward


def test_one_token_prompts_and_unsupported_models():
    tok = build_char_tokenizer("0123456789+")
    model = tiny_causal_lm(tok, hidden=32, layers=2, seed=1).eval()
    prompts = [[7], [8]]  # P = 1: the shared path adds a left pad column
    a = _flat(HFEngine(model, tok).generate(prompts, 3, max_new_tokens=6, seed=2))
    b = _flat(HFEngine(model, tok, share_prefix=False).generate(prompts, 3, max_new_tokens=6, seed=2))
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    # a sliding-window model (no plain full-attention cache) falls back to the unshared path
    from transformers import AutoModelForCausalLM, MistralConfig

    sliding = AutoModelForCausalLM.from_config(
        MistralConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            sliding_window=4,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    calls = _spy_forward(sliding)
    gens = _flat(HFEngine(sliding, tok).generate([[7, 8, 9]], 2, max_new_tokens=2, seed=0))
    assert calls[0]["input_ids"].shape == (2, 3) and len(gens) == 2


@pytest.mark.parametrize("share", [True, False])
def test_preallocated_cache_decodes_in_place_and_samples_the_same(share):
    """Prompt + new tokens >= PREALLOCATE_MIN_POSITIONS: the cache is written in place, and the tokens
    and log-probs are those of the plain dynamic cache (and of the model's own forward)."""
    tok = build_char_tokenizer("0123456789+")
    model = tiny_causal_lm(tok, hidden=32, layers=2, seed=1).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6)
    # 182, 122 tokens
    prompts = [encode_prompt(tok, [{"role": "user", "content": c * 60}]) for c in ("1+2", "45+")]
    assert max(len(p) for p in prompts) + 12 >= PREALLOCATE_MIN_POSITIONS
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.95, seed=4)
    buffers: list[int] = []
    original = _PreallocatedLayer.update

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        buffers.append(self._k.data_ptr())
        return out

    engine = HFEngine(model, tok, share_prefix=share)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_PreallocatedLayer, "update", spy)
        got = _flat(engine.generate(prompts, 3, **kw))
    want = _flat(HFEngine(model, tok, share_prefix=share, preallocate_cache=False).generate(prompts, 3, **kw))
    assert len(buffers) >= 2 * 11 and len(set(buffers[2:])) == 2  # one buffer per layer after the prefill
    assert [(g.response_ids, g.finished) for g in got] == [(g.response_ids, g.finished) for g in want]
    for x, y in zip(got, want):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-6)
    for g, r in zip(got, _reference_logprobs(model, tok, got, 0.8, 0.95)):
        torch.testing.assert_close(torch.tensor(g.logprobs), r, rtol=0, atol=1e-5)


def test_kv_budget_bounds_the_rows_of_a_batch():
    """``kv_budget_mb``: a batch holds at most budget / (KV bytes per position x positions) rows, counted
    from the model's config (layers x 2 x KV heads x head dim x element size)."""
    tok, model, prompts = _setup()
    cfg = model.config
    per_pos = cfg.num_hidden_layers * 2 * (cfg.num_key_value_heads or cfg.num_attention_heads) \
        * (cfg.hidden_size // cfg.num_attention_heads) * 4
    e = HFEngine(model, tok, batch_size=64)
    assert e.kv_bytes_per_position() == per_pos and e.rows_per_batch(10_000) == 64  # no budget: no bound
    positions = max(len(p) for p in prompts) + 6
    budget_mb = 5 * per_pos * positions / 2**20  # room for exactly 5 rows
    bounded = HFEngine(model, tok, batch_size=64, kv_budget_mb=budget_mb)
    assert bounded.rows_per_batch(positions) == 5 and bounded.rows_per_batch(10**9) == 1
    sizes: list[int] = []
    inner = bounded._generate_batch
    bounded._generate_batch = lambda batch, *a: sizes.append(len(batch)) or inner(batch, *a)
    gens = bounded.generate(prompts, 6, max_new_tokens=6, seed=0)
    assert sizes == [5, 5, 2] and sum(len(g) for g in gens) == 12
