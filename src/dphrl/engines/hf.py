"""Hugging Face ``generate`` engine: batched sampling with the exact per-token log-probs.

What is sampled is what is stored. Tokens are drawn from softmax(logits / T) renormalized over the
top-p nucleus (T and top-p as requested, nothing else), and the log-probs returned are those of that
same distribution (``log_softmax`` of the processed scores), recorded step by step by a logits
processor placed after our own warpers (memory: one step's scores, not ``output_scores``' all).

A checkpoint's defaults never take part. ``generate`` fills every field left ``None`` in the
``GenerationConfig`` it is given from ``model.generation_config`` (the checkpoint's
``generation_config.json``: Qwen2.5-Instruct has do_sample, temperature 0.7, top_p 0.8, top_k 20,
repetition_penalty 1.05; Llama-3.1-Instruct do_sample, temperature 0.6, top_p 0.9), then from
transformers' global defaults (top_k 50). So the engine (1) builds a config that sets every field
with a non-``None`` neutral value explicitly, and (2) for the call, makes that same config the
model's ``generation_config`` (restored afterwards), because ``None`` *is* the neutral value of
several processors (bad words, forced tokens, watermarking...) and cannot be pinned otherwise.
Transformers then builds no logits processor and no stopping criterion of its own beyond max length
and our EOS. Fields, their neutral value, and why:

Distribution (sampling; greedy ignores them, transformers reads them only when ``do_sample``):
  temperature 1.0, top_p 1.0  -- T and top-p are applied by our own warpers, *before* the recorder;
      transformers would put its own after our processors, i.e. after the recorder.
  top_k 0 (off)                -- the checkpoint's top_k (20) or transformers' default (50) truncates.
  typical_p 1.0, epsilon_cutoff 0.0, eta_cutoff 0.0, min_p / top_h unset -- other truncations.
Distribution (both modes):
  repetition_penalty 1.0, encoder_repetition_penalty 1.0 -- penalties reshape pi itself (Qwen2.5: 1.05).
  no_repeat_ngram_size 0, encoder_no_repeat_ngram_size 0 -- forbid tokens pi gives mass to.
  bad_words_ids, suppress_tokens, begin_suppress_tokens, sequence_bias unset -- mask or bias tokens.
  forced_bos_token_id, forced_eos_token_id unset -- force a token regardless of pi.
  min_length 0, min_new_tokens unset -- would block EOS early.
  exponential_decay_length_penalty unset -- boosts EOS with length.
  guidance_scale 1.0 -- classifier-free guidance mixes in a second, unconditional forward.
  watermarking_config unset -- biases a pseudo-random "green list" of tokens.
  renormalize_logits False -- a log-softmax after ours; remove_invalid_values False -- rewrites -inf.
  num_beams 1, length_penalty 1.0, early_stopping False; penalty_alpha, dola_layers, constraints,
      force_words_ids, num_beam_groups unset -- beam / contrastive / DoLa / constrained search
      instead of ancestral sampling.
  prompt_lookup_num_tokens, assistant_early_exit unset, use_mtp False, is_assistant False --
      assisted decoding runs the processors over several draft positions per call (the recorder
      assumes one) and may stop on a confidence criterion.
  token_healing False -- rewrites the prompt's last token.
Length, stopping, outputs:
  max_new_tokens (ours); max_time, stop_strings unset -- no wall-clock or text stop.
  eos_token_id, pad_token_id, bos_token_id: the tokenizer's. Only the tokenizer's EOS stops; the
      checkpoint's extra EOS ids are not stop tokens (Qwen2.5 lists its pad token <|endoftext|>),
      so padding is never confused with EOS. EOS is kept as the last response token.
  num_return_sequences 1, return_dict_in_generate / output_scores / output_logits /
      output_attentions / output_hidden_states False -- one row per prompt copy, a plain id tensor.
  use_cache True; cache_implementation, cache_config, compile_config unset -- transformers' default
      dynamic cache and eager forward, not a checkpoint's static cache / compiled forward.
  Custom keys of generation_config.json are not copied either.

Shared prompt prefill (``share_prefix``, on by default). The rows of a ``generate`` batch are the
prompts repeated ``n`` times; recomputing the prompt for each copy is most of the prefill's FLOPs when
prompts are long. The engine instead runs one forward over the batch's *distinct* prompts, all but
their last column (the batch's left-padded layout, columns ``0..P-2``, position ids from the attention
mask exactly as ``generate`` computes them), copies that ``DynamicCache`` to the rows with
``batch_select_indices`` and hands it to ``generate`` (``cache=``) with the full (B, P) prompts: generate
then forwards only the last prompt column and samples as before, through the same neutral config,
warpers and recorder. EOS handling, left padding and ``synced_gpus`` are untouched; every rank runs
exactly one extra prefill forward per batch (the decision depends on ``n`` and the batch size only,
never on the data), so sharded ranks stay in lockstep.

What is and is not identical to ``share_prefix=False`` for the same seed: the sampler consumes the
random stream identically (the same (B, V) draw per step; the prefill draws nothing), and the model
computes the same function, but the prompt's last column is forwarded separately from the rest
(query length 1 instead of P) and the prefill's matrix products have D instead of B rows, which
changes the floats' summation order: log-probs differ in the last bits (< 1e-6 in fp32 on the test
models; bf16 rounds coarser, so expect differences of its own precision there). The tokens are
therefore the same unless a uniform draw falls within that rounding of a boundary between two tokens
(never observed in the tests); the log-probs stay those of the distribution sampled from, to 1e-5
against the model's own full forward (tests/test_sampling_exact.py runs on this path, chi-square tests
included; tests/test_engine.py compares both paths token for token). Models whose cache is not plain
full attention (sliding-window, linear-attention layers) and transformers versions without the
``Cache`` API fall back to the unshared path.

Preallocated KV cache (``preallocate_cache``, on by default, from ``PREALLOCATE_MIN_POSITIONS`` prompt
+ new tokens): transformers' ``DynamicCache`` concatenates the whole cache at every decoding step;
:class:`_PreallocatedLayer` writes each position in place into a buffer sized for the call. Same
values read, same tokens and log-probs (tests/test_engine.py); with 1k-token prompts generation is
several times faster (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from dphrl.batching import pad_token_id
from dphrl.engines.base import Generation
from dphrl.prefix import CACHE_KW, DynamicLayer, empty_prefix_cache

#: Preallocate the KV cache when a batch's prompt + new tokens reach this many positions (below it
#: the per-step concatenation is cheap and strided attention reads were not faster).
PREALLOCATE_MIN_POSITIONS = 128

#: Fields set explicitly to their neutral value in every call (see the module docstring).
NEUTRAL_FIELDS: dict[str, Any] = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "token_healing": False,
    "use_mtp": False,
    "is_assistant": False,
    "use_cache": True,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
}

#: Temperature / truncation fields, read by transformers only when sampling (set in both modes: these
#: values raise no greedy warning). ``top_k`` 0 (off) is added when sampling only: transformers warns
#: about a top_k other than 50 under greedy, and never reads it there.
NEUTRAL_SAMPLING_FIELDS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


def neutral_generation_config(
    *, max_new_tokens: int, greedy: bool, pad_token_id: int | None, eos_token_id: int | None,
    bos_token_id: int | None = None,
) -> GenerationConfig:
    """The full, neutral ``GenerationConfig`` of one call: ancestral sampling (or greedy), no processor.

    Fields whose neutral value is ``None`` stay ``None`` here; :func:`checkpoint_defaults_off` keeps
    ``generate`` from filling them from the checkpoint.
    """
    fields: dict[str, Any] = dict(NEUTRAL_FIELDS, **NEUTRAL_SAMPLING_FIELDS)
    if not greedy:
        fields["top_k"] = 0
    return GenerationConfig(
        **fields, do_sample=not greedy, max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
    )


@contextmanager
def checkpoint_defaults_off(model: torch.nn.Module, gen_cfg: GenerationConfig) -> Iterator[None]:
    """Within the block, ``gen_cfg`` is the ``generation_config`` of every generating module of ``model``.

    ``generate`` merges the config it is given with ``model.generation_config`` (fields left ``None``
    are taken from it); with ``gen_cfg`` itself in that place the merge adds nothing. Covers wrappers:
    a peft model's ``generate`` copies its ``generation_config`` (the inner model's, or one set on the
    wrapper itself) onto the inner model. Restored on exit, errors included.
    """
    swapped = [
        (m, m.generation_config) for m in model.modules()
        if (isinstance(m, GenerationMixin) or "generation_config" in vars(m))
        and getattr(m, "generation_config", None) is not None
    ]
    try:
        for m, _ in swapped:
            m.generation_config = copy.deepcopy(gen_cfg)
        yield
    finally:
        for m, original in swapped:
            m.generation_config = original


class _ChosenTokenLogprobs(LogitsProcessor):
    """Records log pi(chosen token) step by step without keeping every step's full scores.

    Placed after our own sampling warpers (temperature, top-p) and last in the list transformers runs
    (it adds none of its own, see the module docstring), it sees the scores of step t exactly as they
    are sampled from, keeps their log-softmax for one step, and reads the token chosen at step t from
    ``input_ids`` at step t+1. Memory: one (B, V) tensor instead of ``output_scores``' T of them.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None  # (B, V) log-softmax of the last processed scores
        self.chosen: list[torch.Tensor] = []  # T x (B,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.chosen.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))  # (B,)
        self.prev = torch.log_softmax(scores.float(), dim=-1)  # (B, V)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """Close the last step with the final tokens; returns (B, T) log-probs."""
        self.chosen.append(self.prev.gather(-1, last_tokens.unsqueeze(-1)).squeeze(-1))  # (B,)
        return torch.stack(self.chosen, dim=1)  # (B, T)


if DynamicLayer is not None:

    class _PreallocatedLayer(DynamicLayer):
        """A generation-only ``DynamicLayer`` whose keys / values live in a buffer of ``capacity`` positions.

        ``DynamicLayer.update`` concatenates the whole cache with the new position at every decoding
        step: O(length) copying and a fresh allocation per layer and step, most of the decoding time
        with 1k-token prompts (61% of a 40-token decode of 16 rows on a 25M Llama, 1 CPU thread). Here
        a step writes its position in place and the layer exposes a view of the filled part: the same
        values (bitwise the same tokens and log-probs in tests/test_engine.py). The buffer is
        reallocated (with a copy) only when a position does not fit or another method replaced the
        keys (``crop``, ``batch_repeat_interleave``...). Not for training (in-place writes).
        """

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self._k: torch.Tensor | None = None  # (B, heads, capacity, d)
            self._v: torch.Tensor | None = None  # (B, heads, capacity, d)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            old = self.get_seq_length()
            new = old + key_states.shape[-2]
            if (self._k is None or new > self._k.shape[-2] or self._k.shape[:-2] != key_states.shape[:-2]
                    or (old and self.keys.data_ptr() != self._k.data_ptr())):
                cap = max(new, self.capacity, 2 * old)
                # (B, h, cap, d)
                k = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
                # (B, h, cap, d)
                v = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
                if old:
                    k[..., :old, :] = self.keys
                    v[..., :old, :] = self.values
                self._k, self._v = k, v
            self._k[..., old:new, :] = key_states
            self._v[..., old:new, :] = value_states
            self.keys, self.values = self._k[..., :new, :], self._v[..., :new, :]  # (B, h, new, d) views
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Rows ``indices`` of the buffer (the filled part stays a view of it)."""
            n = self.get_seq_length()
            if n > 0:
                self._k, self._v = self._k[indices, ...], self._v[indices, ...]  # (B', h, cap, d)
                self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]


class HFEngine:
    """Sample with ``model.generate`` in left-padded batches of at most ``batch_size`` sequences.

    ``synced_gpus=True`` (sharded training: every forward is a collective) keeps every process decoding
    until all are done; the caller runs :meth:`generate` inside :func:`dphrl.sharding.generation_context`.
    ``share_prefix=True`` prefills each distinct prompt of a batch once and shares its KV cache with the
    prompt's copies (see the module docstring); ``False`` forwards every copy, as plain ``generate``.
    ``preallocate_cache=True`` decodes into a KV cache preallocated for prompt + ``max_new_tokens``
    (:class:`_PreallocatedLayer`) when that reaches :data:`PREALLOCATE_MIN_POSITIONS`; both off is
    exactly the plain ``generate`` call of before.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
        synced_gpus: bool = False,
        share_prefix: bool = True,
        preallocate_cache: bool = True,
        kv_budget_mb: float | None = None,
    ):
        self.model = model
        self.kv_budget_mb = kv_budget_mb  # bounds a batch's KV cache: fewer rows per batch when needed
        self.synced_gpus = synced_gpus
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self.preallocate_cache = preallocate_cache
        self.pad_id = pad_token_id(tokenizer)
        self.eos_id = tokenizer.eos_token_id

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        *,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        if seed is not None:
            torch.manual_seed(seed)
        flat = [p for p in prompts for _ in range(n)]  # each prompt repeated n times, in order
        rows = self.rows_per_batch(max((len(p) for p in prompts), default=1) + max_new_tokens)
        # data-independent (same on every rank): a batch can hold copies of a prompt only when n > 1
        share = self.share_prefix and n > 1 and rows > 1
        out: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(flat), rows):
                batch = flat[i : i + rows]
                out.extend(self._generate_batch(batch, max_new_tokens, temperature, top_p, greedy, share))
        finally:
            self.model.train(was_training)
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def kv_bytes_per_position(self) -> int:
        """Bytes of KV cache one row needs per position: layers x 2 (keys, values) x KV heads x head dim x
        the element size of the model's dtype."""
        cfg = getattr(self.model, "config", None)
        layers = getattr(cfg, "num_hidden_layers", 0)
        heads = getattr(cfg, "num_attention_heads", 1) or 1
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
        elem = next(self.model.parameters()).element_size()
        return int(layers * 2 * kv_heads * head_dim * elem)

    def rows_per_batch(self, positions: int) -> int:
        """``batch_size``, or fewer rows when ``kv_budget_mb`` is set and ``batch_size`` rows of
        ``positions`` (longest prompt + new tokens) would need more KV cache than that (at least 1)."""
        if not self.kv_budget_mb or self.synced_gpus:  # sharded: every rank must batch alike (no data)
            return self.batch_size
        per_row = self.kv_bytes_per_position() * max(1, positions)
        return max(1, min(self.batch_size, int(self.kv_budget_mb * 2**20 // max(1, per_row))))

    def _new_cache(self, capacity: int) -> Any | None:
        """An empty full-attention cache (preallocated for ``capacity`` positions when enabled and large
        enough), or ``None`` when the model's cache is not plain full attention."""
        cache = empty_prefix_cache(self.model)
        if cache is not None and self.preallocate_cache and capacity >= PREALLOCATE_MIN_POSITIONS:
            cache.layers = [_PreallocatedLayer(capacity) for _ in cache.layers]
        return cache

    def _prefill_shared(
        self, input_ids: torch.Tensor, attn: torch.Tensor, prompts: list[list[int]], capacity: int
    ) -> Any | None:
        """The KV cache of columns ``0..P-2`` of the batch, computed once per distinct prompt, one row per
        batch row; ``None`` when the model's cache is not plain full attention (then nothing is run)."""
        cache = self._new_cache(capacity)
        if cache is None:
            return None
        distinct: dict[tuple[int, ...], int] = {}
        reps: list[int] = []  # a batch row holding each distinct prompt
        row_of: list[int] = []  # batch row -> distinct prompt
        for j, p in enumerate(prompts):
            k = distinct.setdefault(tuple(p), len(distinct))
            if k == len(reps):
                reps.append(j)
            row_of.append(k)
        pre_ids = input_ids[reps, :-1]  # (D, P-1) the batch's own left-padded layout
        pre_attn = attn[reps, :-1]  # (D, P-1)
        pos = (pre_attn.cumsum(-1) - 1).masked_fill(pre_attn == 0, 0)  # (D, P-1) as generate computes them
        self.model(
            input_ids=pre_ids,
            attention_mask=pre_attn,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_KW: cache},
        )
        # (B, heads, P-1, d) per layer
        cache.batch_select_indices(torch.tensor(row_of, device=input_ids.device))
        return cache

    def _generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, greedy: bool,
        share: bool = False,
    ) -> list[Generation]:
        device = next(self.model.parameters()).device
        # shared prefill needs >= 1 column before the last one: a batch of 1-token prompts gets a pad column
        plen = max(max(len(p) for p in prompts), 2 if share else 1)
        input_ids = torch.full((len(prompts), plen), self.pad_id, dtype=torch.long)  # (B, P) left-padded
        attn = torch.zeros_like(input_ids)  # (B, P)
        for j, p in enumerate(prompts):
            input_ids[j, plen - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[j, plen - len(p) :] = 1
        input_ids, attn = input_ids.to(device), attn.to(device)
        capacity = plen + max_new_tokens
        if share:
            cache = self._prefill_shared(input_ids, attn, prompts, capacity)
        elif self.preallocate_cache and capacity >= PREALLOCATE_MIN_POSITIONS:
            cache = self._new_cache(capacity)  # empty: generate prefills it, then decodes in place
        else:
            cache = None
        # The only processors: our warpers, in this order, then the recorder (transformers adds none).
        procs: list[LogitsProcessor] = []
        if not greedy and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if not greedy and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        recorder = _ChosenTokenLogprobs()
        procs.append(recorder)
        gen_cfg = neutral_generation_config(
            max_new_tokens=max_new_tokens, greedy=greedy, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
            bos_token_id=getattr(self.tokenizer, "bos_token_id", None),
        )
        seqs, logps = self._decode(input_ids, attn, cache, procs, recorder, gen_cfg, greedy, share)
        return self._generations(prompts, seqs, logps)

    def _decode(self, input_ids: torch.Tensor, attn: torch.Tensor, cache: Any | None,
                procs: list[LogitsProcessor], recorder: _ChosenTokenLogprobs, gen_cfg: GenerationConfig,
                greedy: bool, share: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``model.generate`` over the left-padded batch: (B, T) response tokens and their log-probs (CPU),
        rows finished early padded after their EOS."""
        extra = {CACHE_KW: cache} if cache is not None else {}
        with checkpoint_defaults_off(self.model, gen_cfg):
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attn, generation_config=gen_cfg,
                logits_processor=LogitsProcessorList(procs), synced_gpus=self.synced_gpus, **extra,
            )  # (B, P + T)
        seqs_dev = out[:, input_ids.shape[1]:]  # (B, T)
        logps = recorder.finish(seqs_dev[:, -1]).cpu()  # (B, T); greedy: log-probs at temperature 1
        return seqs_dev.cpu(), logps

    def _generations(self, prompts: list[list[int]], seqs: torch.Tensor, logps: torch.Tensor
                     ) -> list[Generation]:
        """One :class:`Generation` per row: the response up to and including its first EOS."""
        is_eos = seqs == self.eos_id  # (B, T)
        any_eos = is_eos.any(dim=1)  # (B,)
        first_eos = torch.where(
            any_eos, is_eos.float().argmax(dim=1), torch.full_like(any_eos, seqs.shape[1], dtype=torch.long)
        )  # (B,)
        # (B,) EOS kept
        lengths = torch.where(any_eos, first_eos + 1, torch.full_like(first_eos, seqs.shape[1]))
        gens = []
        for j, p in enumerate(prompts):
            L = int(lengths[j])
            ids = seqs[j, :L].tolist()
            text_ids = ids[:-1] if any_eos[j] else ids
            gens.append(
                Generation(
                    prompt_ids=list(p),
                    response_ids=ids,
                    logprobs=logps[j, :L].tolist(),
                    text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                    finished=bool(any_eos[j]),
                )
            )
        return gens
