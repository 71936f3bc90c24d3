"""pack / pad_values / response_logprobs against plain, unpadded forwards."""

from __future__ import annotations

import copy

import pytest
import torch

from dphrl.batching import pack, pad_values, response_logprobs


def test_pack_layout_when_pad_id_equals_eos_id():
    eos = pad = 1  # a tokenizer that pads with its EOS token
    prompts = [[7, 8, 9], [4], [5, 6]]
    responses = [[10, 1], [11, 12, 13, 1], [1]]  # every response ends with EOS == pad
    prompts_before, responses_before = copy.deepcopy(prompts), copy.deepcopy(responses)

    b = pack(prompts, responses, pad_id=pad)

    assert b.prompt_len == 3
    assert b.input_ids.tolist() == [
        [7, 8, 9, 10, eos, pad, pad],
        [pad, pad, 4, 11, 12, 13, eos],
        [pad, 5, 6, eos, pad, pad, pad],
    ]
    assert b.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0, 0, 0],
    ]
    # positions count real tokens only: the first real token of every row is at position 0
    assert b.position_ids[0, :5].tolist() == [0, 1, 2, 3, 4]
    assert b.position_ids[1, 2:].tolist() == [0, 1, 2, 3, 4]
    assert b.position_ids[2, 1:4].tolist() == [0, 1, 2]
    assert b.resp_ids.tolist() == [[10, eos, pad, pad], [11, 12, 13, eos], [eos, pad, pad, pad]]
    # the EOS token is inside the mask although it has the pad id; padding is not
    assert b.resp_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert b.resp_mask.dtype == torch.float32
    assert prompts == prompts_before and responses == responses_before


def test_pack_fixed_resp_len_and_errors():
    b = pack([[3]], [[4, 5]], pad_id=0, resp_len=5)
    assert b.resp_ids.shape == (1, 5) and b.input_ids.shape == (1, 6)
    assert b.resp_mask.tolist() == [[1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="resp_len"):
        pack([[3]], [[4, 5, 6]], pad_id=0, resp_len=2)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack([[3], [4]], [[5]], pad_id=0)


def test_pad_values():
    out = pad_values([[-0.5, -1.0], [-2.0], []], 3, value=9.0)
    assert out.tolist() == [[-0.5, -1.0, 9.0], [-2.0, 9.0, 9.0], [9.0, 9.0, 9.0]]
    assert out.dtype == torch.float32


def _plain_logprobs(model, prompt, response, temperature):
    """Unpadded single-sequence forward: log softmax(logits / T) at the response positions."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float() / temperature  # (L, V)
    lp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(response) - 1], dim=-1)  # (R, V)
    tok_lp = lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)  # (R,)
    ent = -(lp.exp() * lp).sum(-1)  # (R,)
    return tok_lp, ent


def _gpt2(tok):
    """Absolute position embeddings: wrong position ids would change the logits (RoPE would not notice
    a constant shift of the positions of a left-padded row)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("arch,temperature", [("llama", 1.0), ("llama", 0.7), ("qwen2", 1.3), ("gpt2", 0.8)])
def test_response_logprobs_match_plain_forward(tok, make_model, arch, temperature):
    model = (_gpt2(tok) if arch == "gpt2" else make_model(seed=3, arch=arch)).eval()
    eos = tok.eos_token_id
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, len(tok), (n,), generator=g).tolist() for n in (5, 1, 3, 7)]
    responses = [torch.randint(6, len(tok), (n,), generator=g).tolist() for n in (2, 6, 1, 4)]
    responses[0].append(eos)
    responses[2] = [eos]
    batch = pack(prompts, responses, pad_id=eos)  # pad == eos on purpose
    before = copy.deepcopy(
        (
            prompts,
            responses,
            batch.input_ids,
            batch.attention_mask,
            batch.position_ids,
            batch.resp_ids,
            batch.resp_mask,
        )
    )
    with torch.no_grad():
        logp, ent = response_logprobs(model, batch, temperature, with_entropy=True)
    assert logp.shape == batch.resp_mask.shape and ent.shape == batch.resp_mask.shape
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            want_lp, want_ent = _plain_logprobs(model, p, r, temperature)
        assert batch.resp_mask[i].sum().item() == len(r)
        torch.testing.assert_close(logp[i, : len(r)], want_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[i, : len(r)], want_ent, atol=1e-5, rtol=1e-5)
    # nothing was modified in place
    after = (
        prompts,
        responses,
        batch.input_ids,
        batch.attention_mask,
        batch.position_ids,
        batch.resp_ids,
        batch.resp_mask,
    )
    assert before[0] == after[0] and before[1] == after[1]
    for a, b in zip(before[2:], after[2:]):
        assert torch.equal(a, b)


def test_response_logprobs_gradient_and_detached_entropy(tok, make_model):
    model = make_model(seed=1)
    batch = pack([[7, 8], [9]], [[10, 1], [11]], pad_id=0)
    logp, ent = response_logprobs(model, batch, 1.0, with_entropy=True, entropy_grad=False)
    assert logp.requires_grad and not ent.requires_grad
    logp, ent = response_logprobs(model, batch, 1.0, with_entropy=True, entropy_grad=True)
    assert ent.requires_grad
    logp, ent = response_logprobs(model, batch, 1.0)
    assert ent is None
