"""dphrl.head: log-probs from the LM head in row chunks equal the materialized (B, T, V) path.

Values, entropies and gradients (head inputs, the tied head/embedding weight, a LoRA adapter) on both
batch layouts, at several chunk sizes, with a temperature; the fallbacks (top-p, entropy with
gradient, a model that transforms its head's output) and the exact gradient of one row by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from dphrl.batching import pack
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.head import ChunkedHeadLogprob, chunked_head, head_logprobs, hidden_outputs, output_head
from dphrl.prefix import batch_logprobs, pack_groups
from dphrl.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _batch(tok, shared: bool):
    g = torch.Generator().manual_seed(1)
    V = len(tok)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 3)]
    P = [prompts[0]] * 3 + [prompts[1]] * 2
    R = [torch.randint(3, V, (n,), generator=g).tolist() for n in (4, 1, 6, 2, 5)]
    return (pack_groups if shared else pack)(P, R, tok.pad_token_id)


def _grads(model, batch, temperature, chunked, with_entropy=True):
    model.zero_grad(set_to_none=True)
    logp, ent = batch_logprobs(model, batch, temperature, with_entropy=with_entropy, chunked=chunked)
    w = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # (B, T) any fixed weighting
    (logp * batch.resp_mask * w).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), (ent.detach() if ent is not None else None), grads


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_materialized_values_entropy_and_gradients(tok, shared, temperature):
    model = tiny_causal_lm(tok, hidden=32, layers=2)
    model.train()
    assert chunked_head(model) is model.get_output_embeddings()
    batch = _batch(tok, shared)
    m = batch.resp_mask.bool()
    lp0, e0, g0 = _grads(model, batch, temperature, chunked=False)
    lp1, e1, g1 = _grads(model, batch, temperature, chunked=True)
    assert torch.allclose(lp1[m], lp0[m], atol=1e-5)
    assert torch.allclose(e1[m], e0[m], atol=1e-5)
    assert set(g1) == set(g0)  # the tied head/embedding weight gets its gradient too
    for k in g0:
        assert torch.allclose(g1[k], g0[k], atol=1e-5, rtol=1e-4), k


def test_chunk_size_does_not_change_the_result(tok):
    """Rows of one chunk, of many chunks, and one row per chunk: the same log-probs and gradients."""
    model = tiny_causal_lm(tok, hidden=16, layers=1)
    head = output_head(model)
    h0 = torch.randn(3, 4, 16)
    y = torch.randint(0, len(tok), (3, 4))
    out = []
    for elems in (1 << 20, 5 * head.out_features, 1):
        h = h0.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        lp, ent = head_logprobs(h, head, y, 0.5, with_entropy=True, max_chunk_elems=elems)
        (lp * torch.arange(12.0).view(3, 4)).sum().backward()
        out.append((lp.detach(), ent, h.grad, head.weight.grad.clone()))
    for o in out[1:]:
        for a, b in zip(o, out[0]):
            assert torch.allclose(a, b, atol=1e-6)


def test_one_row_by_hand():
    """z = W h / T; d log softmax(z)[y] / dh = W^T (onehot(y) - softmax(z)) / T; dW = (onehot - p) h^T / T."""
    head = torch.nn.Linear(2, 3, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
    h = torch.tensor([[[0.5, -1.0]]], requires_grad=True)  # (1, 1, 2)
    T = 2.0
    lp, ent = head_logprobs(h, head, torch.tensor([[1]]), T, with_entropy=True)
    z = [(0.5 + 0.0) / T, (-2.0 + 0.5) / T, (0.5 + 1.0 - 0.5) / T]  # W h + b, / T
    lse = math.log(sum(math.exp(v) for v in z))
    p = [math.exp(v - lse) for v in z]
    assert lp.item() == pytest.approx(z[1] - lse, abs=1e-6)
    assert ent.item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)
    lp.sum().backward()
    d = [(1.0 if i == 1 else 0.0) - p[i] for i in range(3)]  # d logp / d z
    W = [[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]
    want_h = [sum(d[i] * W[i][j] for i in range(3)) / T for j in range(2)]
    assert h.grad.view(-1).tolist() == pytest.approx(want_h, abs=1e-6)
    want_w = [[d[i] * hv / T for hv in (0.5, -1.0)] for i in range(3)]
    assert head.weight.grad.view(-1).tolist() == pytest.approx(sum(want_w, []), abs=1e-6)
    assert head.bias.grad.tolist() == pytest.approx([v / T for v in d], abs=1e-6)


def test_lora_gradients_match(tok):
    from dphrl.models import apply_lora

    model = apply_lora(tiny_causal_lm(tok, hidden=32, layers=2), r=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    assert chunked_head(model) is not None  # through peft's delegation
    batch = _batch(tok, True)
    lp0, _, g0 = _grads(model, batch, 1.0, chunked=False, with_entropy=False)
    lp1, _, g1 = _grads(model, batch, 1.0, chunked=True, with_entropy=False)
    m = batch.resp_mask.bool()
    assert torch.allclose(lp1[m], lp0[m], atol=1e-5)
    assert g0 and set(g1) == set(g0) and all("lora_" in k for k in g0)
    for k in g0:
        assert torch.allclose(g1[k], g0[k], atol=1e-5, rtol=1e-4), k


def test_fallbacks_top_p_entropy_grad_and_a_transformed_head(tok, monkeypatch):
    model = tiny_causal_lm(tok, hidden=16, layers=1)
    batch = _batch(tok, False)
    calls = []
    monkeypatch.setattr("dphrl.prefix.head_logprobs",
                        lambda *a, **k: calls.append(1) or head_logprobs(*a, **k))
    batch_logprobs(model, batch, 1.0, top_p=0.9)
    batch_logprobs(model, batch, 1.0, with_entropy=True, entropy_grad=True)
    assert calls == []  # both need the full distribution
    batch_logprobs(model, batch, 1.0)
    assert calls == [1]
    # a model that transforms its head's output non-linearly (Gemma-2's logit soft-capping): detected by
    # the one-time probe, never chunked (a linear scale, like Cohere's logit_scale, would stay exact)
    scaled = tiny_causal_lm(tok, hidden=16, layers=1)
    inner_forward = scaled.forward

    def forward(*a, **k):
        out = inner_forward(*a, **k)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    scaled.forward = forward
    assert chunked_head(scaled) is None
    lp, _ = batch_logprobs(scaled, batch, 1.0)
    ref, _ = batch_logprobs(scaled, batch, 1.0, chunked=False)
    assert torch.equal(lp, ref)


def test_hidden_outputs_restores_the_head(tok):
    model = tiny_causal_lm(tok, hidden=16, layers=1)
    head = output_head(model)
    ids = torch.tensor([[4, 5, 6]])
    before = model(input_ids=ids).logits
    with pytest.raises(RuntimeError), hidden_outputs(head):
        assert model(input_ids=ids).logits.shape[-1] == 16
        raise RuntimeError("inside")
    assert torch.equal(model(input_ids=ids).logits, before)
    assert "forward" not in vars(head)


def test_entropy_is_detached_and_inputs_untouched():
    head = torch.nn.Linear(4, 7)
    h = torch.randn(2, 3, 4, requires_grad=True)
    y = torch.randint(0, 7, (2, 3))
    h_before, y_before = h.detach().clone(), y.clone()
    lp, ent = head_logprobs(h, head, y, with_entropy=True)
    assert lp.requires_grad and not ent.requires_grad
    assert torch.equal(h.detach(), h_before) and torch.equal(y, y_before)
    # the Function itself: flat (N, H) rows, an empty entropy when not asked for
    lp2, ent2 = ChunkedHeadLogprob.apply(h.reshape(6, 4), head.weight, head.bias, y.reshape(6), 1.0, False, 2)
    assert torch.allclose(lp2, lp.reshape(6)) and ent2.numel() == 0


def test_refusals_found_in_review(tok):
    """A head with its own instance forward (accelerate's hooks) is never swapped or picked; nesting
    refused; accelerate's mixed-precision forward and DDP's find_unused_parameters with a trained head
    fall back; the probe restores every module's own mode."""
    model = tiny_causal_lm(tok, hidden=16, layers=2)
    head = output_head(model)
    calls = []

    def hooked(x):
        calls.append(1)
        return torch.nn.Linear.forward(head, x)

    head.forward = hooked  # what accelerate's add_hook_to_module does
    assert chunked_head(model) is None
    with pytest.raises(RuntimeError, match="instance-level forward"), hidden_outputs(head):
        pass
    model(input_ids=torch.tensor([[4, 5]]))
    assert vars(head)["forward"] is hooked and calls == [1]
    del head.forward
    with hidden_outputs(head), pytest.raises(RuntimeError, match="nested use"), hidden_outputs(head):
        pass
    assert "forward" not in vars(head)

    amp = tiny_causal_lm(tok, hidden=16, layers=1)
    amp._original_forward = amp.forward  # accelerate's mixed precision marks the model so
    assert chunked_head(amp) is None

    class FakeDDP(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module, self.find_unused_parameters = m, True

    assert chunked_head(FakeDDP(tiny_causal_lm(tok, hidden=16, layers=1))) is None  # tied head: trained

    probe = tiny_causal_lm(tok, hidden=16, layers=2)
    probe.train()
    probe.model.layers[0].eval()  # a submodule the user left in eval
    assert chunked_head(probe) is not None
    assert probe.training and not probe.model.layers[0].training and probe.model.layers[1].training


def test_double_backward_is_refused_not_silently_wrong():
    head = torch.nn.Linear(4, 5)
    h = torch.randn(1, 3, 4, requires_grad=True)
    lp, _ = head_logprobs(h, head, torch.randint(0, 5, (1, 3)))
    (g,) = torch.autograd.grad(lp.sum(), h, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
