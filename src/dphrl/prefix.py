"""Shared-prefix log-probs: a group's prompt is forwarded once, its rollouts attend to its KV cache.

In RLVR every rollout of a group shares the group's prompt, and prompts are often much longer than
the responses (SQL prompts with schemas: 1-4k tokens for 100-300 response tokens). The packed
forward of :mod:`dphrl.batching` recomputes the prompt for every rollout. Here a micro-batch is
forwarded in two passes ("Prefix Grouper"-style sharing, with the KV cache instead of a block mask):

1. the batch's *distinct* prompts, left-padded to P, with ``use_cache=True``: a ``DynamicCache`` of
   (G, heads, P, d) per layer, and the logits of the last prompt position (they predict every
   rollout's first response token);
2. the rollouts' response tokens but the last, right-padded to T-1, on top of that cache copied to the
   rollouts (``batch_select_indices``: an index, so autograd sums the rollouts' gradients back into the
   one prompt forward), with the prompt's attention mask prepended and position ids continuing after
   the prompt's length.

The log-probs and their gradients w.r.t. every parameter equal the packed computation (``pack`` +
``response_logprobs``) up to float summation order (tests/test_prefix.py: 1e-5 in fp32, Llama and
Qwen2). Both forwards always run (also for 1-token responses), so sharded ranks run the same number
of collectives. The prompt's KV cache is not detached: the prompt forward gets the gradient of all of
its rollouts. Gradient checkpointing drops the cache inside the layers during training; that is
detected and refused (use the packed path).

:func:`plan_micro_batches` / :func:`micro_batch_order` build micro-batches that keep a group's
sequences together and sort by length, so that little is padded and each prompt is forwarded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dphrl.batching import (
    Packed,
    pack,
    response_head_outputs,
    response_logits,
    response_logprobs,
    token_logprobs,
)
from dphrl.head import chunked_head, head_logprobs, hidden_outputs

try:  # transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` before)
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.modeling_outputs import CausalLMOutputWithPast

    #: The keyword under which ``forward`` / ``generate`` take a cache in the installed transformers.
    CACHE_KW = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
except ImportError:  # pragma: no cover - transformers without the layered cache: no prefix sharing
    DynamicCache = DynamicLayer = None  # type: ignore[assignment,misc]
    CACHE_KW = "past_key_values"


def empty_prefix_cache(model: torch.nn.Module) -> Any | None:
    """An empty ``DynamicCache`` for ``model`` when every layer is plain full attention, else ``None``.

    Sliding-window, linear-attention or indexed layers (and transformers without the layered cache
    API) are not shared: a caller falls back to the unshared computation. Depends on the model's
    config only, so it is the same on every rank.
    """
    # the model or, under a wrapper without ``config`` (DDP, FSDP1, torch.compile),
    # its first submodule with one
    config = next(
        (c for m in model.modules() if hasattr(c := getattr(m, "config", None), "get_text_config")), None
    )
    if DynamicCache is None or config is None:
        return None
    try:
        cache = DynamicCache(config=config)
    except (TypeError, ValueError, AttributeError):
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return cache


# --------------------------------------------------------------------------------------------------
# packing


@dataclass
class PrefixPacked:
    """A micro-batch laid out for the shared-prefix forward (the counterpart of ``batching.Packed``).

    Rows keep the order of the ``(prompt, response)`` pairs given to :func:`pack_groups`; ``resp_ids``
    and ``resp_mask`` have the same meaning and shape as ``Packed``'s, so a loss written for ``Packed``
    works unchanged.
    """

    prompt_ids: torch.Tensor  # (G, P) distinct prompts, left-padded
    prompt_mask: torch.Tensor  # (G, P) 1 on real prompt tokens
    prompt_lens: torch.Tensor  # (G,) real prompt lengths
    group_of: torch.Tensor  # (B,) long: row -> its prompt in prompt_ids
    resp_ids: torch.Tensor  # (B, T) right-padded responses
    resp_mask: torch.Tensor  # (B, T) float, 1 on real response tokens (EOS included)

    @property
    def prompt_len(self) -> int:
        """P, the padded prompt width."""
        return int(self.prompt_ids.shape[1])

    def prompt_position_ids(self) -> torch.Tensor:
        """(G, P) positions counting real tokens only (0 on the left padding), as ``pack`` computes them."""
        return (self.prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (G, P)

    def response_position_ids(self, width: int) -> torch.Tensor:
        """(B, width) positions of the response columns: prompt length + 0, 1, ..."""
        steps = torch.arange(width, device=self.resp_ids.device)  # (width,)
        return self.prompt_lens[self.group_of].unsqueeze(1) + steps  # (B, width)

    def to(self, device: torch.device | str) -> PrefixPacked:
        return PrefixPacked(
            self.prompt_ids.to(device), self.prompt_mask.to(device), self.prompt_lens.to(device),
            self.group_of.to(device), self.resp_ids.to(device), self.resp_mask.to(device),
        )


def pack_groups(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, resp_len: int | None = None
) -> PrefixPacked:
    """Like ``batching.pack`` (same arguments), but each distinct prompt is stored once.

    Rows with equal prompt ids share one prompt row, wherever they are in the list; rows keep their order.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"pack_groups: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("pack_groups: empty batch")
    distinct: dict[tuple[int, ...], int] = {}
    group_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    uniq = [list(p) for p in distinct]
    if any(not p for p in uniq):
        raise ValueError("pack_groups: empty prompt (the first response token needs a prompt position)")
    G, P = len(uniq), max(len(p) for p in uniq)
    B, T = len(responses), max(1, resp_len or max(len(r) for r in responses))
    prompt_ids = torch.full((G, P), pad_id, dtype=torch.long)  # (G, P)
    prompt_mask = torch.zeros((G, P), dtype=torch.long)  # (G, P)
    for g, p in enumerate(uniq):
        prompt_ids[g, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        prompt_mask[g, P - len(p) :] = 1
    resp_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    resp_mask = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
    for i, r in enumerate(responses):
        if len(r) > T:
            raise ValueError(f"pack_groups: response {i} has {len(r)} tokens > resp_len {T}")
        if r:
            resp_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            resp_mask[i, : len(r)] = 1.0
    lens = torch.tensor([len(p) for p in uniq], dtype=torch.long)  # (G,)
    return PrefixPacked(
        prompt_ids, prompt_mask, lens, torch.tensor(group_of, dtype=torch.long), resp_ids, resp_mask
    )


# --------------------------------------------------------------------------------------------------
# log-probs


def prefix_response_logits(
    model: torch.nn.Module, batch: PrefixPacked, temperature: float = 1.0
) -> torch.Tensor:
    """``batching.response_logits`` on a :class:`PrefixPacked` batch: fp32 logits / temperature at the
    response positions, (B, T, V), each prompt forwarded once. Two forwards, always."""
    logits = prefix_head_outputs(model, batch).float()  # (B, T, V)
    return logits / temperature if temperature != 1.0 else logits


def prefix_head_outputs(model: torch.nn.Module, batch: PrefixPacked) -> torch.Tensor:
    """``batching.response_head_outputs`` on a :class:`PrefixPacked` batch: the head's outputs (B, T, V)
    in the model's dtype, or its inputs (B, T, H) under :func:`dphrl.head.hidden_outputs`."""
    cache = empty_prefix_cache(model)
    if cache is None:
        raise ValueError(
            "prefix sharing needs a model whose layers all use full attention with a DynamicCache "
            "(sliding-window / linear-attention models: use batching.pack + response_logprobs)"
        )
    P, T = batch.prompt_len, batch.resp_ids.shape[1]
    out = model(
        input_ids=batch.prompt_ids,
        attention_mask=batch.prompt_mask,
        position_ids=batch.prompt_position_ids(),
        use_cache=True,
        logits_to_keep=1,
        **{CACHE_KW: cache},
    )
    if cache.get_seq_length() != P:
        raise RuntimeError(
            "prefix sharing: the model did not fill the KV cache during the prompt forward (gradient "
            "checkpointing drops the cache in training); use batching.pack + response_logprobs instead")
    first = out.logits[:, -1, :]  # (G, V) (or H): the last prompt position predicts response token 0
    # every layer (B, heads, P, d), gradient summed back per prompt
    cache.batch_select_indices(batch.group_of)
    # tokens 0..T-2 predict tokens 1..T-1; one column even when T == 1 (same collectives)
    width = max(T - 1, 1)
    attn = torch.cat(
        [batch.prompt_mask[batch.group_of], batch.resp_mask[:, :width].to(batch.prompt_mask.dtype)], dim=1
    )  # (B, P + width)
    rest = model(
        input_ids=batch.resp_ids[:, :width],
        attention_mask=attn,
        position_ids=batch.response_position_ids(width),
        use_cache=True,
        logits_to_keep=0 if T > 1 else 1,
        **{CACHE_KW: cache},
    ).logits  # (B, width, V)
    # (B, T, V); with T == 1 the response forward's output joins as a 0-width slice: its backward still
    # runs, so every rank's backward has the same collectives (FSDP2 hangs otherwise)
    rest = rest if T > 1 else rest[:, :0]
    return torch.cat([first[batch.group_of].unsqueeze(1), rest.to(first.dtype)], dim=1)  # (B, T, V)


def prefix_response_logprobs(
    model: torch.nn.Module,
    batch: PrefixPacked,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``batching.response_logprobs`` on a :class:`PrefixPacked` batch: each prompt forwarded once.

    Returns ``logp`` (B, T) and ``entropy`` (B, T) or None, exactly as ``response_logprobs`` (values on
    padding are meaningless: mask with ``batch.resp_mask``). Two forwards, always.
    """
    logits = prefix_response_logits(model, batch, temperature)  # (B, T, V) already / temperature
    return token_logprobs(logits, batch.resp_ids, with_entropy, entropy_grad, top_p)


# --------------------------------------------------------------------------------------------------
# one interface over both layouts (the trainer's forwards)

Batch = Packed | PrefixPacked


def pack_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, shared: bool) -> Batch:
    """``pack_groups`` (each distinct prompt once) when ``shared``, else ``batching.pack``."""
    return pack_groups(prompts, responses, pad_id) if shared else pack(prompts, responses, pad_id)


def batch_logits(model: torch.nn.Module, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) fp32 response logits / temperature of either layout."""
    if isinstance(batch, PrefixPacked):
        return prefix_response_logits(model, batch, temperature)
    return response_logits(model, batch, temperature)


def batch_logprobs(
    model: torch.nn.Module, batch: Batch, temperature: float = 1.0, with_entropy: bool = False,
    entropy_grad: bool = False, top_p: float = 1.0, chunked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) response log-probs (and entropy or None) of either layout.

    ``chunked`` (the default): through :mod:`dphrl.head`, the (B, T, V) logits never materialized,
    wherever that is exact (:func:`dphrl.head.chunked_head`) and neither top-p nor an entropy with
    gradient needs the full distribution; else the materialized path."""
    use_head = chunked and top_p == 1.0 and not (entropy_grad and torch.is_grad_enabled())
    head = chunked_head(model) if use_head else None
    if head is not None:
        outputs = prefix_head_outputs if isinstance(batch, PrefixPacked) else response_head_outputs
        with hidden_outputs(head):
            h = outputs(model, batch)  # (B, T, H) the head's inputs
        return head_logprobs(h, head, batch.resp_ids, temperature, with_entropy)
    fn = prefix_response_logprobs if isinstance(batch, PrefixPacked) else response_logprobs
    return fn(model, batch, temperature, with_entropy=with_entropy, entropy_grad=entropy_grad, top_p=top_p)


def can_share_prefix(model: torch.nn.Module, gradient_checkpointing: bool = False) -> bool:
    """Whether the shared-prefix update applies to ``model``: every layer full attention with a
    ``DynamicCache``, and no gradient checkpointing (it drops the cache inside the layers): neither the
    flag, nor a model whose modules already checkpoint (``gradient_checkpointing`` set by transformers,
    or torch's ``CheckpointWrapper``, e.g. FSDP activation checkpointing)."""
    checkpointed = any(
        getattr(m, "gradient_checkpointing", False) is True or type(m).__name__ == "CheckpointWrapper"
        for m in model.modules()
    )
    return not (gradient_checkpointing or checkpointed) and empty_prefix_cache(model) is not None


# --------------------------------------------------------------------------------------------------
# micro-batch planning


def group_by_prompt(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of the sequences sharing each distinct prompt, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    return list(groups.values())


def micro_batch_cost(prompt_lens: Sequence[int], resp_lens: Sequence[int]) -> int:
    """Padded tokens forwarded by a shared-prefix micro-batch: G x max prompt + B x max response."""
    if not resp_lens:
        return 0
    return len(prompt_lens) * max(prompt_lens, default=0) + len(resp_lens) * max(max(resp_lens), 1)


Plan = list[list[tuple[int, list[int]]]]


def plan_cost(groups: Sequence[tuple[int, Sequence[int]]], plan: Plan) -> int:
    """Padded tokens a plan forwards: the sum of :func:`micro_batch_cost` over its micro-batches."""
    return sum(micro_batch_cost([groups[g][0] for g, _ in mb], [groups[g][1][i] for g, ix in mb for i in ix])
               for mb in plan)


def plan_micro_batches(groups: Sequence[tuple[int, Sequence[int]]], *, max_seqs: int) -> Plan:
    """Micro-batches of at most ``max_seqs`` sequences that forward the fewest padded tokens of two plans.

    ``groups[g] = (prompt_len, response lengths)``. Returns micro-batches, each a list of
    ``(g, indices into groups[g]'s responses)``; every sequence appears exactly once. The two plans:

    * whole groups (:func:`_whole_group_plan`): each prompt forwarded once, but a micro-batch is as
      wide as its longest response, so groups whose lengths spread widely pad a lot;
    * by length (:func:`_by_length_plan`): all sequences sorted longest first and cut into
      consecutive micro-batches, each prompt forwarded once per micro-batch that holds some of its
      sequences. With a real model's responses (SmolLM2 at 128 new tokens: lengths 3-128, 1 in 5 cut
      in most groups) this forwards far fewer padded tokens.

    The cheaper by :func:`plan_cost` wins (whole groups on a tie). Gradients do not depend on the plan
    (every loss is normalized by global counts), only the time and the padding do.
    """
    if max_seqs < 1:
        raise ValueError(f"plan_micro_batches: max_seqs must be >= 1, got {max_seqs}")
    whole = _whole_group_plan(groups, max_seqs)
    by_length = _by_length_plan(groups, max_seqs)
    return by_length if plan_cost(groups, by_length) < plan_cost(groups, whole) else whole


def _by_length_plan(groups: Sequence[tuple[int, Sequence[int]]], max_seqs: int) -> Plan:
    """All sequences longest response first (ties: longer prompt, then group), cut into consecutive
    micro-batches of ``max_seqs``; inside one, each group's sequences are contiguous."""
    seqs = sorted(((g, i) for g, (_, rl) in enumerate(groups) for i in range(len(rl))),
                  key=lambda gi: (-groups[gi[0]][1][gi[1]], -groups[gi[0]][0], gi[0], gi[1]))
    plan: Plan = []
    for k in range(0, len(seqs), max_seqs):
        mb: dict[int, list[int]] = {}
        for g, i in seqs[k : k + max_seqs]:
            mb.setdefault(g, []).append(i)
        plan.append(list(mb.items()))
    return plan


def _whole_group_plan(groups: Sequence[tuple[int, Sequence[int]]], max_seqs: int) -> Plan:
    """Whole groups where possible: groups go longest response first (so a micro-batch holds similar
    lengths), each whole into the current micro-batch if it fits, else into a new one; a group larger
    than ``max_seqs`` is split (its longest sequences first), which forwards its prompt once per piece."""

    def fits(items: list[tuple[int, list[int]]]) -> bool:
        return sum(len(ix) for _, ix in items) <= max_seqs

    def order(g: int) -> tuple[int, int, int]:
        plen, rlens = groups[g]
        return (-max(rlens, default=0), -plen, g)

    plan: list[list[tuple[int, list[int]]]] = []
    cur: list[tuple[int, list[int]]] = []
    for g in sorted((g for g in range(len(groups)) if len(groups[g][1])), key=order):
        rlens = groups[g][1]
        seqs = sorted(range(len(rlens)), key=lambda i: (-rlens[i], i))  # longest first
        if fits(cur + [(g, seqs)]):
            cur.append((g, seqs))
            continue
        if cur and fits([(g, seqs)]):
            plan.append(cur)
            cur = [(g, seqs)]
            continue
        piece: list[int] = []  # the group alone is too large: split it, filling the current micro-batch first
        for i in seqs:
            if fits(cur + [(g, piece + [i])]):
                piece.append(i)
                continue
            if piece or cur:
                plan.append(cur + ([(g, piece)] if piece else []))
            cur, piece = [], [i]
        cur = cur + [(g, piece)]
    if cur:
        plan.append(cur)
    return plan


def micro_batch_order(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, max_seqs: int
) -> list[list[int]]:
    """Sequence indices of each micro-batch of :func:`plan_micro_batches` over ``(prompts, responses)``.

    Sequences sharing a prompt are grouped wherever they are in the list; within a micro-batch a
    group's sequences are contiguous.
    """
    index = group_by_prompt(prompts)
    groups = [(len(prompts[ix[0]]), [len(responses[i]) for i in ix]) for ix in index]
    plan = plan_micro_batches(groups, max_seqs=max_seqs)
    return [[index[g][i] for g, ix in mb for i in ix] for mb in plan]


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
    *,
    micro_batch_size: int = 16,
    device: torch.device | str | None = None,
    top_p: float = 1.0,
    chunked: bool = True,
) -> list[list[float]]:
    """Per-token log pi(response | prompt) at ``temperature`` (fp32) of each pair, no grad
    (``chunked``: through :mod:`dphrl.head` where exact, as :func:`batch_logprobs`).

    One forward per micro-batch, planned as the trainer plans its update (:func:`micro_batch_order`: a
    prompt's responses together, similar lengths together) and each prompt forwarded once where the
    model allows (:func:`can_share_prefix`), else the packed layout. Works on plain and peft models;
    runs in eval mode (no dropout), restoring the model's mode after; call it under the training
    autocast for the training numerics. The plan depends on the data and ``micro_batch_size`` only, so
    two models scored on one set see identical batches. Users: presample's recomputed log pi_ref
    (engines without exact log-probs), the TRL integration's store check, the forgetting measure.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    dev = device if device is not None else next(model.parameters()).device
    shared = can_share_prefix(model)
    out: list[list[float]] = [[] for _ in responses]
    was_training = model.training
    model.eval()
    try:
        for ix in micro_batch_order(prompts, responses, max_seqs=micro_batch_size):
            ps, rs = [prompts[i] for i in ix], [responses[i] for i in ix]
            batch = pack_batch(ps, rs, pad_id, shared).to(dev)
            lp, _ = batch_logprobs(model, batch, temperature, top_p=top_p, chunked=chunked)  # (B, T)
            for i, r, row in zip(ix, rs, lp.float().cpu()):
                out[i] = row[: len(r)].tolist()
    finally:
        model.train(was_training)
    return out
