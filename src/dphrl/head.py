"""Response log-probs from the LM head without the (B, T, V) logits: row chunks, recomputed in backward.

The update needs, per response token, log pi(y_t) = z[y_t] - logsumexp(z) with z = W h / temperature,
and (as a diagnostic) the entropy. Materialized, z is B x T x V fp32 (16 x 128 x 49,152 = 403 MB for
SmolLM2) and autograd holds 3-4 tensors of that size at the peak (the logits, their temperature-scaled
copy, the softmax in backward, the gradient). :class:`ChunkedHeadLogprob` computes the same numbers
``rows`` at a time and keeps (B x T x H) tensors only: the gradient w.r.t. the head's input is formed
in the forward (it does not depend on the upstream gradient), so with a frozen head (LoRA) nothing
is recomputed; a trained head (full fine-tuning) recomputes each chunk's softmax in backward. Same
values and gradients as the materialized path up to float summation order (tests/test_head.py).

:func:`hidden_outputs` makes the model return its head's *input* instead of logits (the head's
``forward`` is swapped for the identity for one call), so the forward still runs through the
top-level module (DDP hooks, peft, accelerate); :func:`chunked_head` says whether that is exact for a
model: the head must be a plain ``nn.Linear`` (not sharded, not quantized), autocast off, and the
model must not transform the head's output non-linearly (Gemma-2's soft-capping; a linear logit scale
commutes with the head and stays exact): checked once per model, in eval mode, by comparing one
position's logits both ways (a transform that appears only in training mode or after that check is
not seen). Not used under accelerate's mixed precision (``dtype: bfloat16``: the head runs in bf16
inside the forward's autocast, and the chunks would run in fp32), with DDP's
``find_unused_parameters`` and a trained head, or on a head with accelerate's hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

#: floats of one chunk's (rows, V) logits: 2**25 = 128 MiB fp32
MAX_CHUNK_ELEMS = 1 << 25


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """fp32 logits / temperature of rows ``h`` (r, H) exactly as ``head(h).float() / temperature``."""
    z = F.linear(h, weight, bias).float()  # (r, V)
    return z / temperature if temperature != 1.0 else z


class ChunkedHeadLogprob(torch.autograd.Function):
    """(N, H) head inputs, (N,) targets -> (N,) log-probs and (N,) entropies (or an empty tensor).

    d logp_n / d h_n = W^T (onehot(y_n) - softmax(z_n)) / T does not depend on the upstream gradient,
    so the forward computes it chunk by chunk (N x H, small) and backward only scales it: no logits
    are recomputed for the head's input. The head's weight and bias (full fine-tuning: a tied embedding)
    need the upstream gradient per row: for them backward recomputes each chunk's softmax. The entropy
    is a detached diagnostic."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature: float, with_entropy: bool, rows: int):
        N = h.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        logp = torch.empty(N, dtype=torch.float32, device=h.device)  # (N,)
        logz = torch.empty(N, dtype=torch.float32, device=h.device)  # (N,)
        ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=h.device)  # (N,)
        dh = torch.empty_like(h) if need_h else None  # (N, H) d logp / d h, per row
        for s in range(0, N, rows):
            z = _chunk_logits(h[s : s + rows], weight, bias, temperature)  # (r, V)
            lz = torch.logsumexp(z, dim=-1)  # (r,)
            y = targets[s : s + rows].unsqueeze(-1)  # (r, 1)
            logz[s : s + rows] = lz
            logp[s : s + rows] = z.gather(-1, y).squeeze(-1) - lz
            if with_entropy or need_h:
                p = torch.exp(z - lz.unsqueeze(-1))  # (r, V)
            if with_entropy:
                ent[s : s + rows] = lz - (p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1)
            if need_h:
                q = p.neg_().scatter_add_(-1, y, torch.ones_like(y, dtype=p.dtype))  # (r, V) onehot - p
                if temperature != 1.0:
                    q = q / temperature
                dh[s : s + rows] = q.to(h.dtype) @ weight.to(h.dtype)  # (r, H)
        ctx.save_for_backward(h if (need_w or need_b) else None, weight, bias, targets, logz, dh)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, _g_ent):
        h, weight, bias, targets, logz, dh = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_h = dh * g_logp.unsqueeze(-1).to(dh.dtype) if need_h else None  # (N, H)
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        if need_w or need_b:
            for s in range(0, h.shape[0], rows):
                hs, g = h[s : s + rows], g_logp[s : s + rows].float()  # (r, H), (r,)
                z = _chunk_logits(hs, weight, bias, T)  # (r, V)
                dz = torch.exp(z - logz[s : s + rows].unsqueeze(-1)).mul_(-g.unsqueeze(-1))  # (r, V) -g p
                dz.scatter_add_(-1, targets[s : s + rows].unsqueeze(-1), g.unsqueeze(-1))  # + g at the target
                if T != 1.0:
                    dz = dz / T
                dz = dz.to(h.dtype)  # the gradient of .float(): back to the head's dtype
                if need_w:
                    g_w += (dz.t() @ hs).float()  # (V, H)
                if need_b:
                    g_b += dz.sum(0).float()  # (V,)
        g_w = g_w.to(weight.dtype) if need_w else None
        g_b = g_b.to(bias.dtype) if need_b else None
        return g_h, g_w, g_b, None, None, None, None


def head_logprobs(
    h: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
    with_entropy: bool = False, max_chunk_elems: int = MAX_CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, H) head inputs and (B, T) targets -> (B, T) log-probs and (B, T) entropy or None."""
    B, T, H = h.shape
    rows = max(1, max_chunk_elems // max(1, head.out_features))
    flat = h.reshape(B * T, H)  # (N, H)
    logp, ent = ChunkedHeadLogprob.apply(
        flat, head.weight, head.bias, targets.reshape(B * T), float(temperature), with_entropy, rows
    )
    return logp.view(B, T), (ent.view(B, T) if with_entropy else None)


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head of ``model`` (through DDP's ``.module`` and peft's delegation), or None."""
    inner = getattr(model, "module", model)
    get = getattr(inner, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def hidden_outputs(head: torch.nn.Module) -> Iterator[None]:
    """Inside, ``head`` returns its input: the model's ``.logits`` are the (.., H) head inputs.

    Not re-entrant and not thread-safe (the swap is an instance attribute); a head whose instance
    already has its own ``forward`` (accelerate's device-map hooks put one there) is refused, never
    overwritten: :func:`chunked_head` does not pick such a head."""
    if "forward" in vars(head):
        raise RuntimeError("hidden_outputs: the head already has an instance-level forward (nested use, or "
                           "accelerate's hooks); refusing to replace it")
    head.forward = _identity  # instance attribute: shadows the class's forward, module hooks still run
    try:
        yield
    finally:
        del head.forward


_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def chunked_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The head to compute log-probs with in chunks, or None when that would not be exact: the head is
    not a plain dense ``nn.Linear`` (sharded DTensor, quantized), autocast is on (the head's matmul
    would run in another dtype), or the model transforms the head's output (checked once per model:
    one position's logits computed both ways must agree)."""
    head = output_head(model)
    if not isinstance(head, torch.nn.Linear) or type(head.weight) is not torch.nn.Parameter:
        return None
    if "forward" in vars(head) or hasattr(head, "_hf_hook"):  # accelerate hooks, or already swapped
        return None
    inner = getattr(model, "module", model)
    if hasattr(inner, "_original_forward") or hasattr(model, "_original_forward"):
        return None  # accelerate's mixed precision: the forward runs under autocast, the head in bf16/fp16
    if getattr(model, "find_unused_parameters", False) and head.weight.requires_grad:
        return None  # DDP would mark the head's weight unused (it is used after DDP's forward)
    if type(head.weight.data) is not torch.Tensor or torch.is_autocast_enabled(head.weight.device.type):
        return None
    if tuple(head.weight.shape) != (head.out_features, head.in_features):  # FSDP1: a flat shard
        return None
    ok = _CHECKED.get(model)
    if ok is None:
        ok = _CHECKED[model] = _agrees(model, head)
    return head if ok else None


@torch.no_grad()
def _agrees(model: torch.nn.Module, head: torch.nn.Linear) -> bool:
    """One forward of two tokens both ways: do the model's logits equal ``head(its hidden output)``?"""
    ids = torch.tensor([[1, 2]], device=head.weight.device)
    modes = {m: m.training for m in model.modules()}  # restored module by module afterwards
    model.eval()
    try:
        ref = model(input_ids=ids, use_cache=False).logits[:, -1].float()  # (1, V)
        with hidden_outputs(head):
            h = model(input_ids=ids, use_cache=False).logits[:, -1]  # (1, H) or not
        if h.shape[-1] != head.in_features:
            return False
        got = _chunk_logits(h, head.weight, head.bias, 1.0)  # (1, V)
        return bool(torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max().clamp(min=1.0))))
    except Exception:  # a model whose code after the head needs (.., V) outputs: not chunkable
        return False
    finally:
        for m, training in modes.items():
            m.training = training
