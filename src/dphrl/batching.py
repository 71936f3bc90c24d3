"""Pack (prompt, response) pairs into tensors and compute response log-probs in one forward pass.

Layout: prompts are left-padded to a common length P and responses right-padded to T, so every
response starts at column P. One forward with ``logits_to_keep=T+1`` then yields the logits that
predict exactly the response tokens: the LM head and the softmax never run on prompt positions.
``resp_mask`` marks real response tokens *including* the EOS token (the policy gets gradient for
stopping); padding is identified by position (length), never by token id, so a pad id equal to the
EOS id cannot hide the EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # (B, P+T)
    attention_mask: torch.Tensor  # (B, P+T)
    position_ids: torch.Tensor  # (B, P+T)
    resp_ids: torch.Tensor  # (B, T)
    resp_mask: torch.Tensor  # (B, T) float, 1 on real response tokens (EOS included)
    prompt_len: int  # P

    def to(self, device: torch.device | str) -> Packed:
        return Packed(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
            self.resp_ids.to(device), self.resp_mask.to(device), self.prompt_len,
        )


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS
    (masks, never ids, tell them apart)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return int(pad)


def pack(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, resp_len: int | None = None
) -> Packed:
    """Left-pad prompts, right-pad responses (to ``resp_len`` or the longest response)."""
    if len(prompts) != len(responses):
        raise ValueError(f"pack: {len(prompts)} prompts but {len(responses)} responses")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(1, resp_len or max(len(r) for r in responses))
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)  # (B, P+T)
    attn = torch.zeros((B, P + T), dtype=torch.long)  # (B, P+T)
    resp_mask = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(r) > T:
            raise ValueError(f"pack: response {i} has {len(r)} tokens > resp_len {T}")
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if r:
            input_ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, P : P + len(r)] = 1
            resp_mask[i, : len(r)] = 1.0
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, P+T) positions count real tokens only
    return Packed(input_ids, attn, position_ids, input_ids[:, P:].clone(), resp_mask, P)


def pad_values(rows: list[list[float]], T: int, value: float = 0.0) -> torch.Tensor:
    """Right-pad per-token float lists (e.g. stored log-probs) into a (B, T) tensor."""
    out = torch.full((len(rows), T), value, dtype=torch.float32)  # (B, T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def response_head_outputs(model: torch.nn.Module, batch: Packed) -> torch.Tensor:
    """The model's head outputs at the response positions, in the model's dtype, (B, T, V): one forward
    with ``logits_to_keep = T + 1`` (the LM head never runs on prompt positions). Under
    :func:`dphrl.head.hidden_outputs` they are the head's inputs, (B, T, H)."""
    T = batch.resp_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=T + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]  # (B, T, V): position P-1+t predicts response token t


def response_logits(model: torch.nn.Module, batch: Packed, temperature: float = 1.0) -> torch.Tensor:
    """The policy's fp32 logits / temperature at the response positions, (B, T, V)."""
    logits = response_head_outputs(model, batch).float()  # (B, T, V)
    return logits / temperature if temperature != 1.0 else logits


def response_logprobs(
    model: torch.nn.Module,
    batch: Packed,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) / temperature-scaled, for each response token; optionally the entropy.

    Returns ``logp`` (B, T) and ``entropy`` (B, T) or None; values on padding are meaningless and
    must be masked with ``batch.resp_mask``. The entropy carries gradient only with ``entropy_grad``
    (an entropy bonus); otherwise it is a detached diagnostic computed in row chunks, without a second
    (B, T, V) tensor. ``top_p < 1`` renormalizes over the nucleus exactly as the HF engine samples
    (transformers' ``TopPLogitsWarper``): how a store sampled with top-p is re-scored.
    """
    logits = response_logits(model, batch, temperature)  # (B, T, V)
    return token_logprobs(logits, batch.resp_ids, with_entropy, entropy_grad, top_p)


def token_logprobs(
    logits: torch.Tensor, resp_ids: torch.Tensor, with_entropy: bool = False, entropy_grad: bool = False,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-prob head shared by both batch layouts: (B, T, V) fp32 logits (already / temperature)
    predicting the (B, T) ``resp_ids`` -> ``logp`` (B, T) and entropy (B, T) or None (see
    :func:`response_logprobs`). The entropy with gradient is finite under top-p (0 * -inf masked)."""
    if top_p < 1.0:
        from transformers import TopPLogitsWarper

        B, T, V = logits.shape
        # (B, T, V) -inf outside
        logits = TopPLogitsWarper(top_p)(None, logits.reshape(B * T, V)).reshape(B, T, V)
    logz = torch.logsumexp(logits, dim=-1)  # (B, T)
    logp = logits.gather(-1, resp_ids.unsqueeze(-1)).squeeze(-1) - logz  # (B, T)
    entropy = None
    if with_entropy:
        if entropy_grad and torch.is_grad_enabled():
            probs = torch.softmax(logits, dim=-1)  # (B, T, V)
            # (B, T, V) 0 * -inf outside top-p
            finite = torch.where(probs > 0, logits, torch.zeros_like(logits))
            entropy = logz - (probs * finite).sum(-1)  # (B, T)
        else:
            entropy = _entropy_no_grad(logits.detach(), logz.detach())  # (B, T)
    return logp, entropy


@torch.no_grad()
def _entropy_no_grad(logits: torch.Tensor, logz: torch.Tensor, max_elems: int = 1 << 24) -> torch.Tensor:
    """Entropy logz - sum softmax * logits, row chunk by row chunk: at most ``max_elems`` extra floats."""
    B, T, V = logits.shape
    rows = max(1, max_elems // max(1, T * V))
    out = torch.empty_like(logz)  # (B, T)
    for i in range(0, B, rows):
        lg, lz = logits[i : i + rows], logz[i : i + rows]  # (b, T, V), (b, T)
        p = torch.exp(lg - lz.unsqueeze(-1))  # (b, T, V)
        out[i : i + rows] = lz - (p * torch.where(p > 0, lg, torch.zeros_like(lg))).sum(-1)  # (b, T)
    return out
