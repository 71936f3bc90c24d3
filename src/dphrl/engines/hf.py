"""Hugging Face ``generate`` engine: batched sampling with the exact per-token log-probs.

The log-probs returned are those of the distribution actually sampled from: logits divided by the
temperature, top-p applied, then renormalized (``log_softmax`` of the processed scores), recorded
step by step by a logits processor (memory of one step's scores, not ``output_scores``' all). A fresh
``GenerationConfig`` is built for every call so that a checkpoint's defaults (``top_k=50``,
repetition penalties...) never silently truncate or distort the sampling distribution.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from dphrl.engines.base import Generation


class _ChosenTokenLogprobs(LogitsProcessor):
    """Records log pi(chosen token) step by step without keeping every step's full scores.

    Placed after our own sampling warpers (temperature, top-p), it sees the processed scores of step t,
    keeps their log-softmax for one step, and reads the token chosen at step t from ``input_ids`` at
    step t+1. Memory: one (B, V) tensor instead of ``output_scores``' T of them.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None  # (B, V) log-softmax of the last processed scores
        self.chosen: list[torch.Tensor] = []  # T x (B,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.chosen.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """Close the last step with the final tokens; returns (B, T) log-probs."""
        self.chosen.append(self.prev.gather(-1, last_tokens.unsqueeze(-1)).squeeze(-1))
        return torch.stack(self.chosen, dim=1)


class HFEngine:
    """Sample with ``model.generate`` in left-padded batches of at most ``batch_size`` sequences.

    ``synced_gpus=True`` (sharded training: every forward is a collective) keeps every process decoding
    until all are done; the caller runs :meth:`generate` inside :func:`dphrl.sharding.generation_context`.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 64, synced_gpus: bool = False
    ):
        self.model = model
        self.synced_gpus = synced_gpus
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
        out: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(flat), self.batch_size):
                out.extend(self._generate_batch(flat[i : i + self.batch_size], max_new_tokens, temperature, top_p, greedy))
        finally:
            self.model.train(was_training)
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, greedy: bool
    ) -> list[Generation]:
        device = next(self.model.parameters()).device
        plen = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), plen), self.pad_id, dtype=torch.long)  # (B, P) left-padded
        attn = torch.zeros_like(input_ids)
        for j, p in enumerate(prompts):
            input_ids[j, plen - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[j, plen - len(p) :] = 1
        # The warpers are ours, in this order, followed by the recorder: transformers merges custom
        # processors *before* its own warpers, so it is given none (temperature 1, no top-p/top-k).
        procs: list[LogitsProcessor] = []
        if not greedy and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if not greedy and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        recorder = _ChosenTokenLogprobs()
        procs.append(recorder)
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else 1.0,
            top_p=None,
            top_k=0 if not greedy else None,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            bos_token_id=getattr(self.tokenizer, "bos_token_id", None),
        )
        out = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attn.to(device), generation_config=gen_cfg,
            logits_processor=LogitsProcessorList(procs), synced_gpus=self.synced_gpus,
        )
        seqs_dev = out[:, plen:]  # (B, T)
        logps = recorder.finish(seqs_dev[:, -1]).cpu()  # (B, T); greedy: log-probs at temperature 1
        seqs = seqs_dev.cpu()
        is_eos = seqs == self.eos_id  # (B, T)
        any_eos = is_eos.any(dim=1)
        first_eos = torch.where(any_eos, is_eos.float().argmax(dim=1), torch.full_like(any_eos, seqs.shape[1], dtype=torch.long))
        lengths = torch.where(any_eos, first_eos + 1, torch.full_like(first_eos, seqs.shape[1]))  # EOS kept
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
