"""DPH-RL on TRL: ``DPHGRPOTrainer``, a ``trl.GRPOTrainer`` whose loss gains a divergence on stored samples.

The objective is the paper's ``L = L_TRL(rollouts of D_exp prompts) + eta * L_div(stored pi_ref samples of
D_pef prompts)``. TRL computes the first term exactly as it would alone (any ``loss_type``, clipping,
vLLM importance correction, entropy bonus...), with ``beta = 0`` so that TRL neither adds its k3 term nor
loads a reference model. The second term is dphrl's
:func:`dphrl.divergences.divergence_loss` (``forward_kl``, ``js``, ``alpha``... in log space, with its
tail guard) on reference samples read from a dphrl reference store (``dphrl presample``), so no reference
model exists at any time: log pi_ref comes from the store.

Where the term is added, and why its gradient is exactly scaled
----------------------------------------------------------------
The hook is ``compute_loss``, which ``transformers.Trainer.training_step`` calls once per micro-step
(``gradient_accumulation_steps`` micro-steps make one optimizer step) and whose result it backpropagates.
``DPHGRPOTrainer.compute_loss`` returns ``TRL's loss + this micro-step's share of the reference term``;
TRL's ``_compute_loss`` is not touched.

* One reference batch per optimizer step: ``ref_prompts_per_step`` D_pef prompts with all their stored
  samples, drawn by a function of ``(seed, state.global_step)`` only (the same shuffled passes as
  dphrl's own ``Trainer``), so every rank draws the same batch without communication and a resumed run
  continues the same stream.
* The batch is sharded over ranks ``[rank::world]`` (as in dphrl's ``Trainer``) and each rank's share is
  spread over the micro-steps of the optimizer step in slices of ``ceil(ceil(n / world) / GA)``
  sequences (or ``ref_batch_size``: fewer, larger forwards). Every rank runs the same number of
  reference forwards of the same number of sequences on the same micro-steps (under FSDP / ZeRO-3 every
  forward is a collective); a rank with fewer samples pads with zero-weight copies (their gradient is
  exactly 0), micro-steps where no rank has a sample run no reference forward at all.
* Normalization: ``N`` = number of real reference tokens of the whole optimizer step, summed over ranks
  (one all-reduce per optimizer step) and over micro-steps. Micro-step ``m`` on rank ``r`` adds
  ``eta * W * sum_{its tokens} f(u_t) / N`` (``W`` = number of processes). ``GRPOTrainer`` declares
  ``loss_is_scaled_for_ga = True``, so the Trainer backpropagates the returned loss as is; gradients are
  summed over micro-steps and averaged over ranks by DDP / FSDP / ZeRO. The accumulated gradient is
  therefore ``eta * grad(sum_{all reference tokens} f(u_t) / N)``: the token-mean over the global
  reference batch, whatever TRL's ``loss_type`` does to its own term and independent of the number of
  processes and of gradient accumulation (tested: 1 process with 1 or 3 micro-steps and 2 processes give
  the same gradient as dphrl's own ``Trainer._reference_loss`` on the same samples).
* Spreading over the micro-steps rather than adding everything on the first one is equally exact and
  keeps the extra activation memory to one slice per micro-step and the micro-steps equally long;
  ``ref_batch_size`` trades that memory for fewer, larger forwards (exact too).

Log-probs of the policy on reference samples go through TRL's own fused LM head (the forward TRL patches
with ``add_fused_lm_head``: log-softmax of ``logits / args.temperature``, chunked, ``cast_lm_head_to_fp32``
honoured), with explicit ``position_ids`` counting real tokens only (dphrl's packing, the positions the
samples were generated and scored with). The store's log pi_ref were taken at the store's sampling
temperature, so ``args.temperature`` must equal it (refused otherwise).

Refused, with the argument and the fix in the message, before anything is loaded: ``beta != 0`` (TRL
would add its own k3 term and load a reference model), ``use_liger_loss`` (a TRL version whose Liger path
computes the policy loss in its own kernel), a temperature different from the store's, a TRL version
without the hooks this class relies on; and dphrl's store checks: another top-p, tokenizer or weights
than the store's, stored log pi_ref the model does not reproduce (start-up re-scoring). The term is
training-only (not added in evaluation).
Metrics, in TRL's logs once per optimizer step: ``dph/div`` (mean per-token divergence), ``dph/loss``
(``eta * dph/div``), ``dph/log_ratio_mean`` (mean of log pi_theta - log pi_ref), ``dph/ref_tokens`` and
``dph/ref_sequences`` (global counts). Tested with TRL 1.16.0.

Adapters: :func:`trl_reward` turns a dphrl reward into a TRL reward function, :func:`trl_dataset` turns
dphrl examples into a TRL dataset (D_exp prompts only when given a store).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl
from datasets import Dataset
from torch import Tensor
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer

from dphrl import divergences
from dphrl.algorithms import DEFAULT_ETA
from dphrl.batching import pack, pad_token_id, pad_values
from dphrl.data.example import Example
from dphrl.reference import ReferenceStore, RefSample, StoreMismatchError
from dphrl.rehearsal import rehearsed_prompts_per_step
from dphrl.rewards.registry import RewardFn, get_reward, score_batch

__all__ = [
    "TESTED_TRL_VERSION",
    "DPHGRPOTrainer",
    "UnsupportedTRLSetupError",
    "check_trl_support",
    "plan_reference_slices",
    "trl_dataset",
    "trl_reward",
]

log = logging.getLogger(__name__)

#: The TRL version the integration is tested with (tests/test_trl_integration.py).
TESTED_TRL_VERSION = "1.16.0"

#: Example fields carried through the dataset as columns (``meta`` as a JSON string).
_EXAMPLE_COLUMNS = ("id", "answer", "gold_sql", "db_path", "task", "meta")
#: Keyword arguments TRL passes to reward functions that are not dataset columns.
_TRL_REWARD_KWARGS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


class UnsupportedTRLSetupError(ValueError):
    """A TRL setting or version that would bypass or mis-scale the DPH term."""


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# ---------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------
def check_trl_support() -> None:
    """Refuse a TRL whose GRPOTrainer lacks what ``DPHGRPOTrainer`` relies on (clear message, the fix)."""
    missing = []
    if not callable(getattr(GRPOTrainer, "compute_loss", None)):
        missing.append("GRPOTrainer.compute_loss (the hook overridden)")
    if not callable(getattr(GRPOTrainer, "_compute_loss", None)):
        missing.append("GRPOTrainer._compute_loss (TRL's loss, called through compute_loss)")
    if getattr(GRPOTrainer, "loss_is_scaled_for_ga", None) is not True:
        missing.append(
            "GRPOTrainer.loss_is_scaled_for_ga = True (the returned loss is backpropagated unscaled)"
        )
    try:
        from trl.trainer.utils import add_fused_lm_head  # noqa: F401
    except ImportError:
        missing.append("trl.trainer.utils.add_fused_lm_head (log-probs at TRL's temperature)")
    if missing:
        raise UnsupportedTRLSetupError(
            f"DPHGRPOTrainer cannot add its divergence term exactly with TRL {trl.__version__}: missing "
            + "; ".join(missing)
            + f". It is tested with TRL {TESTED_TRL_VERSION}: pip install 'trl=={TESTED_TRL_VERSION}'."
        )


def _check_args(args: GRPOConfig, store_temperature: float) -> None:
    """Refuse settings that would add TRL's KL term, bypass ours, or make log-probs incomparable."""
    if args.beta != 0.0:
        raise UnsupportedTRLSetupError(
            f"DPHGRPOTrainer needs GRPOConfig(beta=0.0), got beta={args.beta}: DPH-RL replaces TRL's k3 KL "
            "term (computed against a live reference model, which TRL would load as a second copy of the "
            "weights) by eta * divergence on stored reference samples. Set beta=0.0 and weight the "
            "divergence with eta=..."
        )
    if getattr(args, "use_liger_loss", False):
        raise UnsupportedTRLSetupError(
            "DPHGRPOTrainer does not support use_liger_loss=True: the Liger fused GRPO loss computes the "
            "policy loss in its own kernel instead of TRL's compute_loss/_compute_loss path that "
            "DPHGRPOTrainer extends. Set use_liger_loss=False."
        )
    if abs(float(args.temperature) - float(store_temperature)) > 1e-9:
        raise UnsupportedTRLSetupError(
            f"GRPOConfig(temperature={args.temperature}) differs from the reference store's sampling "
            f"temperature {store_temperature}: TRL divides the logits by its temperature, and the stored log "
            f"pi_ref were taken at {store_temperature}, so log pi_theta - log pi_ref would compare two "
            f"different distributions. Set temperature={store_temperature}, or re-run `dphrl presample` at "
            f"temperature {args.temperature}."
        )


# ---------------------------------------------------------------------------------------------------
# the reference batch: which samples, on which rank and micro-step
# ---------------------------------------------------------------------------------------------------
class _ReferenceStream:
    """The D_pef prompts of each optimizer step: dphrl's ``PromptSampler`` stream, addressable by step.

    ``indices(w)`` equals the ``w + 1``-th call of ``PromptSampler(n, seed).next(k)`` (consecutive shuffled
    passes, no prompt twice in one step), the stream dphrl's own ``Trainer`` draws with the same seed. The
    next step is one ``next`` call; any other step (a resumed run) replays the stream from the start, so
    the result depends on ``(n, k, seed, w)`` only and every rank agrees without communication.
    """

    def __init__(self, n: int, k: int, seed: int):
        self.n, self.k, self.seed = n, k, seed
        self._sampler: Any = None
        self._next = 0  # the window the sampler's next call returns

    def indices(self, window: int) -> list[int]:
        from dphrl.data.sampler import PromptSampler

        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        if self._sampler is None or window < self._next:
            self._sampler, self._next = PromptSampler(self.n, self.seed), 0
        while self._next < window:
            self._sampler.next(self.k)
            self._next += 1
        self._next += 1
        return self._sampler.next(self.k)


def plan_reference_slices(
    samples: Sequence[RefSample], rank: int, world: int, num_micro: int, batch_size: int | None = None
) -> list[list[tuple[RefSample, float]]]:
    """This rank's reference sequences for each micro-step of an optimizer step, with weights.

    Rank ``r`` owns ``samples[r::world]`` (even sharding). Each micro-step that runs a reference forward
    gets exactly ``per`` sequences on every rank, padded with zero-weight copies of ``samples[0]``;
    micro-steps where no rank has a real sample get ``[]`` on every rank. So every rank runs the same
    forwards on the same micro-steps, and every sample has weight 1 exactly once. ``per`` is
    ``ceil(ceil(n / world) / num_micro)`` (spread over all micro-steps: least extra memory per micro-step),
    raised to ``batch_size`` when given (fewer, larger forwards on the first micro-steps), capped by the
    largest shard.
    """
    if world < 1 or not 0 <= rank < world or num_micro < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"plan_reference_slices: bad rank {rank} / world {world} / num_micro {num_micro} / "
                         f"batch_size {batch_size}")
    n = len(samples)
    if n == 0:
        return [[] for _ in range(num_micro)]
    local = list(samples[rank::world])
    max_local = math.ceil(n / world)
    per = math.ceil(max_local / num_micro)
    if batch_size is not None:
        per = max(per, min(max_local, batch_size))
    active = math.ceil(max_local / per)
    out: list[list[tuple[RefSample, float]]] = []
    for m in range(num_micro):
        if m >= active:
            out.append([])
            continue
        chunk = [(s, 1.0) for s in local[m * per : (m + 1) * per]]
        out.append(chunk + [(samples[0], 0.0)] * (per - len(chunk)))
    return out


@dataclass
class _Window:
    """State of one optimizer step (gradient-accumulation window) of the reference term."""

    index: int  # state.global_step when the window started: picks the reference batch
    num_micro: int
    slices: list[list[tuple[RefSample, float]]]
    num_tokens: float  # global real reference tokens of the optimizer step
    micro: int = 0
    # f, log-ratio, tokens, seqs (local)
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------
class DPHGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` + ``eta * divergence`` on stored pi_ref samples (DPH-RL);
    see the module docstring.

    Arguments are ``GRPOTrainer``'s (``args.beta`` must be 0) plus:

    * ``reference_store``: a dphrl reference store (path or :class:`~dphrl.reference.ReferenceStore`). Train
      on its D_exp prompts (:func:`trl_dataset` with the store builds that dataset); its D_pef samples are
      rehearsed.
    * ``divergence`` / ``divergence_params``: a name of :mod:`dphrl.divergences` (``js``, ``forward_kl``,
      ``alpha`` with ``{"alpha": a}``, ...) and its parameters.
    * ``eta``: weight of the term; default 0.2 for ``js``, 0.01 for ``forward_kl``, else 0.1 (dphrl's).
    * ``ref_prompts_per_step``: D_pef prompts rehearsed per optimizer step (all their stored samples; at
      most every D_pef prompt once); default ``round(P * |D_pef| / |D_exp|)`` with ``P`` the rollout
      prompts of one optimizer step (``per_device_train_batch_size * world * gradient_accumulation_steps /
      num_generations``), as dphrl's.
    * ``ref_seed``: seed of the reference stream; default ``args.seed + 1`` (dphrl's ``Trainer`` uses
      ``seed + 1``: the same seeds rehearse the same prompts in the same order).
    * ``ref_batch_size``: reference sequences per forward. Default: the rank's share spread evenly over the
      micro-steps (the least extra activation memory next to TRL's own micro-batch); a larger value (e.g.
      ``per_device_train_batch_size``) runs fewer, larger reference forwards on the first micro-steps
      (faster where small forwards are inefficient, more memory on those micro-steps). Exact either way.
    * ``store_check_tokens`` / ``store_check_tolerance``: at start-up, this many stored tokens are re-scored
      by the model and the store is refused when the mean |stored - recomputed log pi| exceeds the
      tolerance (default by dtype, as dphrl's: 1e-3 in fp32, 5e-2 with bf16); 0 skips the check.

    Refused at construction (before anything is loaded): ``beta != 0``, ``use_liger_loss``, a temperature or
    top-p other than the store's, another tokenizer or other weights than the store's.
    """

    _tag_names = ["trl", "grpo", "dphrl", "dph-rl"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        *,
        reference_store: str | Path | ReferenceStore,
        divergence: str = "js",
        eta: float | None = None,
        divergence_params: dict[str, Any] | None = None,
        ref_prompts_per_step: int | None = None,
        ref_seed: int | None = None,
        ref_batch_size: int | None = None,
        store_check_tokens: int = 256,
        store_check_tolerance: float | None = None,
        **kwargs: Any,
    ) -> None:
        check_trl_support()
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = GRPOConfig(f"{str(name).split('/')[-1]}-DPH")
        self.store = (
            reference_store
            if isinstance(reference_store, ReferenceStore)
            else ReferenceStore(reference_store)
        )
        sampling = self.store.manifest.get("sampling", {})
        _check_args(args, float(sampling.get("temperature", float("nan"))))
        self.divergence = divergence
        self.divergence_params = dict(divergence_params or {})
        self.eta = float(DEFAULT_ETA.get(divergence, 0.1) if eta is None else eta)
        if not (self.eta >= 0.0 and math.isfinite(self.eta)):
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        z = torch.zeros(1, 1)
        # unknown name / params fail here
        divergences.per_token_loss(divergence, z, z, **self.divergence_params)
        if store_check_tokens < 0:
            raise ValueError(
                f"store_check_tokens must be >= 0 (0 = skip the check), got {store_check_tokens}"
            )
        # compatibility, before TRL touches the tokenizer (pad token) or the model (LoRA): the dphrl checks
        processing_class = kwargs.get("processing_class")
        if processing_class is not None:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            self._check_store(tokenizer=tokenizer, model=model, args=args)

        self.pef_ids = list(self.store.pef_ids)
        n_exp = len(self.store.exp_ids)
        if ref_prompts_per_step is not None and ref_prompts_per_step < 0:
            raise ValueError(f"ref_prompts_per_step must be >= 0, got {ref_prompts_per_step}")
        per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        self.ref_prompts_per_step = rehearsed_prompts_per_step(
            ref_prompts_per_step, per_step / args.num_generations, len(self.pef_ids), n_exp)
        self.ref_seed = int(args.seed + 1 if ref_seed is None else ref_seed)
        if ref_batch_size is not None and ref_batch_size < 1:
            raise ValueError(f"ref_batch_size must be >= 1 (or None), got {ref_batch_size}")
        self.ref_batch_size = ref_batch_size
        self._ref_stream = _ReferenceStream(
            max(1, len(self.pef_ids)), self.ref_prompts_per_step, self.ref_seed
        )
        self._dph_window: _Window | None = None

        super().__init__(model, reward_funcs, args, train_dataset, **kwargs)

        if processing_class is None:  # TRL loaded the tokenizer (and the model, if given by name)
            self._check_store(tokenizer=self._tokenizer, model=self.model, args=args)
        self._dph_pad_id = pad_token_id(self._tokenizer)
        self.store_check: dict[str, float] = {}
        if store_check_tokens and self.pef_ids:
            self.store_check = self._verify_store(store_check_tokens, store_check_tolerance)
        self._warn_pef_in_dataset(train_dataset)
        if self.accelerator.is_main_process:
            log.info(
                "DPHGRPOTrainer: %s eta=%s; store %s: %d D_pef prompts with samples, %d D_exp; %d D_pef "
                "prompts rehearsed per optimizer step",
                divergence,
                self.eta,
                self.store.path,
                len(self.pef_ids),
                n_exp,
                self.ref_prompts_per_step,
            )

    # ---------------------------------------------------------------------------------------- checks
    def _check_store(self, *, tokenizer: Any, model: Any, args: GRPOConfig) -> None:
        """dphrl's ``check_compatible``: same tokenizer, weights (when fingerprintable), temperature,
        top-p."""
        from dphrl.models import tokenizer_hash, weights_fingerprint

        # unknown: the store check re-scores instead
        fingerprint = self.store.manifest.get("model_fingerprint")
        if isinstance(model, PreTrainedModel) and not _is_peft(model):
            fingerprint = weights_fingerprint(model)
        self.store.check_compatible(
            model_fingerprint=fingerprint, tokenizer_hash=tokenizer_hash(tokenizer),
            temperature=float(args.temperature), top_p=float(args.top_p),
        )

    def _verify_store(self, max_tokens: int, tolerance: float | None) -> dict[str, float]:
        """Re-score stored tokens with the model (no grad, training autocast);
        refuse a store from other weights."""
        from dphrl.prefix import sequence_logprobs
        from dphrl.reference import verify_store

        def rescore(samples: list[RefSample], top_p: float) -> list[list[float]]:
            with self.accelerator.autocast():
                return sequence_logprobs(
                    self.model,
                    [s.prompt_ids for s in samples],
                    [s.response_ids for s in samples],
                    self._dph_pad_id,
                    float(self.args.temperature),
                    micro_batch_size=16,
                    device=self.accelerator.device,
                    top_p=top_p,
                )

        train_dtype = "bfloat16" if (self.args.bf16 or self.args.fp16) else "float32"
        return verify_store(
            self.store, rescore, max_tokens=max_tokens, tolerance=tolerance, train_dtype=train_dtype
        )

    def _warn_pef_in_dataset(self, dataset: Any) -> None:
        cols = getattr(dataset, "column_names", None)
        if not cols or "id" not in cols:
            return
        pef = set(self.pef_ids)
        n = sum(1 for i in dataset["id"] if i in pef)
        if n:
            log.warning(
                "DPHGRPOTrainer: %d training prompts are D_pef prompts of the store; DPH-RL rolls out D_exp "
                "only (build the dataset with trl_dataset(examples, store))",
                n,
            )

    # ---------------------------------------------------------------------------------------- reference batch
    def reference_batch(self, window: int) -> list[RefSample]:
        """The global reference batch of optimizer step ``window``:
        all stored samples of its D_pef prompts."""
        if not self.ref_prompts_per_step:
            return []
        return [s for i in self._ref_stream.indices(window) for s in self.store.samples[self.pef_ids[i]]]

    def _start_window(self) -> _Window:
        """Draw this optimizer step's batch, plan this rank's slices, all-reduce the global token count."""
        num_micro = int(
            getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        )
        index = int(self.state.global_step)
        batch = self.reference_batch(index)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        slices = plan_reference_slices(batch, rank, world, num_micro, self.ref_batch_size)
        expected = float(sum(len(s.response_ids) for s in batch))
        num_tokens = expected
        # sum over ranks of the real tokens each one holds: checks that all drew alike
        if batch and world > 1:
            local = sum(len(s.response_ids) for sl in slices for s, w in sl if w > 0)
            t = torch.tensor([float(local)], dtype=torch.float64, device=self.accelerator.device)
            num_tokens = float(self.accelerator.reduce(t, reduction="sum").item())
            if num_tokens != expected:
                raise RuntimeError(
                    f"DPH reference batch differs between ranks at optimizer step {index}: {num_tokens} "
                    f"tokens summed over ranks, {expected} in this rank's draw. All ranks must read the same "
                    "reference store."
                )
        return _Window(index, num_micro, slices, num_tokens)

    # ---------------------------------------------------------------------------------------- the term
    def reference_loss(
        self, model: torch.nn.Module, items: Sequence[tuple[RefSample, float]], num_tokens: float
    ) -> tuple[Tensor, dict[str, float]]:
        """``eta * W * sum_{weighted tokens} f(u_t) / num_tokens`` on ``items`` and its local sums.

        ``W`` is the number of processes (DDP-style averaging over ranks then gives the global token-mean);
        ``num_tokens`` is the global real-token count of the optimizer step. Sums (``f``, ``log_ratio``,
        ``tokens``, ``seqs``) cover the real (weight > 0) sequences only.
        """
        dev = self.accelerator.device
        samples = [s for s, _ in items]
        batch = pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], self._dph_pad_id).to(
            dev
        )
        P, T = batch.prompt_len, batch.resp_ids.shape[1]
        weights = torch.tensor([w for _, w in items], dtype=torch.float32, device=dev)  # (B,)
        mask = batch.resp_mask * weights[:, None]  # (B, T) 0 on padding and on zero-weight sequences
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # (B, P+T)
        labels[:, :P] = -100  # only response tokens are scored
        labels[weights == 0] = -100  # zero-weight copies: no LM-head work where the kernel can skip it
        with self.accelerator.autocast():
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                labels=labels,
                fused_lm_head=True,
            )
        logp = getattr(out, "log_probs", None)
        if logp is None:
            raise UnsupportedTRLSetupError(
                "the model's forward did not return log_probs with fused_lm_head=True: TRL's fused LM head "
                f"is not installed on it (TRL {trl.__version__}; tested with {TESTED_TRL_VERSION})"
            )
        logp = logp[:, P - 1 : P - 1 + T].float()  # (B, T): position P-1+t predicts response token t
        ref = pad_values([s.ref_logprobs if w > 0 else [] for s, w in items], T).to(dev)  # (B, T)
        world = self.accelerator.num_processes
        div, m = divergences.divergence_loss(
            self.divergence, logp, ref, mask, agg="token-mean", num_tokens=num_tokens / world,
            **self.divergence_params,
        )
        n_tok = float(mask.sum().item())
        n_seq = float((weights > 0).sum().item())
        sums = {"f": m["div/value"] * n_tok, "log_ratio": m["div/log_ratio_mean"] * n_tok,
                "tokens": n_tok, "seqs": n_seq}
        return self.eta * div, sums

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss of this micro-step plus this micro-step's share of the reference term
        (training only)."""
        loss = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self.model.training or not self.ref_prompts_per_step:
            return loss
        if self._dph_window is not None and self._dph_window.index != self.state.global_step:
            self._dph_window = None  # an interrupted window (e.g. train() called again): start afresh
        if self._dph_window is None:
            self._dph_window = self._start_window()
        win = self._dph_window
        items = win.slices[win.micro] if win.micro < len(win.slices) else []
        if items:
            term, sums = self.reference_loss(model, items, win.num_tokens)
            loss = loss + term.to(loss.dtype)
            for i, k in enumerate(("f", "log_ratio", "tokens", "seqs")):
                win.sums[i] += sums[k]
        win.micro += 1
        if win.micro >= win.num_micro:
            self._log_window(win)
            self._dph_window = None
        return loss

    def _log_window(self, win: _Window) -> None:
        """Reduce the window's sums over ranks (one all-reduce) and append TRL metrics."""
        t = torch.tensor(win.sums, dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        f_sum, d_sum, tokens, seqs = t.tolist()
        metrics = self._metrics["train"]
        div = f_sum / tokens if tokens else 0.0
        metrics["dph/div"].append(div)
        metrics["dph/loss"].append(self.eta * div)
        metrics["dph/log_ratio_mean"].append(d_sum / tokens if tokens else 0.0)
        metrics["dph/ref_tokens"].append(tokens)
        metrics["dph/ref_sequences"].append(seqs)


# ---------------------------------------------------------------------------------------------------
# adapters: rewards and datasets
# ---------------------------------------------------------------------------------------------------
def _completion_text(completion: Any) -> str:
    """TRL completions are strings (standard format) or message lists (conversational): the assistant text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        parts = [m.get("content", "") for m in completion
                 if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        return "".join(p if isinstance(p, str) else "" for p in parts)
    return str(completion)


def _example_at(prompt: Any, columns: dict[str, list[Any]], i: int) -> Example:
    """Rebuild the dphrl ``Example`` of row ``i`` from the dataset columns TRL passes as kwargs."""
    def col(name: str) -> Any:
        values = columns.get(name)
        return values[i] if values is not None else None

    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    meta = col("meta")
    if isinstance(meta, str):
        meta = json.loads(meta) if meta else {}
    meta = dict(meta or {})
    for k, v in columns.items():  # any other dataset column (e.g. "solution") rides along in meta
        if (
            k not in _EXAMPLE_COLUMNS
            and k not in _TRL_REWARD_KWARGS
            and k != "prompt"
            and isinstance(v, list)
        ):
            meta.setdefault(k, v[i])
    ex_id = col("id")
    return Example(
        id=str(ex_id) if ex_id is not None else f"row{i}",
        prompt=messages,
        answer=None if col("answer") is None else str(col("answer")),
        gold_sql=col("gold_sql"),
        db_path=col("db_path"),
        task=col("task") or "math",
        meta=meta,
    )


def trl_reward(
    reward: str | RewardFn,
    *,
    timeout_s: float = 10.0,
    num_workers: int = 0,
    max_failure_frac: float = 1.0,
) -> Callable[..., list[float]]:
    """A TRL reward function ``(prompts, completions, **columns) -> list[float]`` from a dphrl reward.

    ``reward`` is a registered name (``math``, ``sql``, ...), ``package.module:fn`` or a callable
    ``fn(response_text, example) -> float``. Each completion is scored against the ``Example`` rebuilt from
    the dataset columns TRL passes (build the dataset with :func:`trl_dataset`), with
    :func:`dphrl.rewards.score_batch`: a per-item time-out, optional killable worker processes; failures
    and time-outs score 0 and are counted (attributes ``failures``, ``timeouts`` of the returned function,
    and TRL metrics ``dphrl/reward_failures``, ``dphrl/reward_timeouts``). More than ``max_failure_frac``
    failed items in one call raises ``RuntimeError``.
    """
    fn = get_reward(reward) if isinstance(reward, str) else reward
    if not callable(fn):
        raise TypeError(f"trl_reward: {reward!r} is not callable")
    label = reward if isinstance(reward, str) else getattr(reward, "__name__", "reward")

    def reward_fn(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        examples = [_example_at(p, kwargs, i) for i, p in enumerate(prompts)]
        texts = [_completion_text(c) for c in completions]
        scored = score_batch(fn, texts, examples, timeout_s=timeout_s, num_workers=num_workers)
        reward_fn.failures += scored.failures  # type: ignore[attr-defined]
        reward_fn.timeouts += scored.timeouts  # type: ignore[attr-defined]
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric("dphrl/reward_failures", float(scored.failures))
            log_metric("dphrl/reward_timeouts", float(scored.timeouts))
        bad = scored.failures + scored.timeouts
        if texts and bad / len(texts) > max_failure_frac:
            raise RuntimeError(
                f"reward {label!r}: {bad} of {len(texts)} evaluations failed or timed out (> "
                f"max_failure_frac={max_failure_frac}); first error: "
                f"{next(iter(scored.errors.values()), 'n/a')}"
            )
        return scored.scores

    reward_fn.failures = 0  # type: ignore[attr-defined]
    reward_fn.timeouts = 0  # type: ignore[attr-defined]
    reward_fn.__name__ = f"dphrl_{str(label).replace(':', '_').replace('.', '_')}"
    return reward_fn


def trl_dataset(examples: Sequence[Example], store: str | Path | ReferenceStore | None = None) -> Dataset:
    """A TRL dataset in conversational prompt format from dphrl examples; D_exp prompts only with a store.

    Columns: ``prompt`` (the example's chat messages) plus the ``Example`` fields ``id``, ``answer``,
    ``gold_sql``, ``db_path``, ``task`` and ``meta`` (JSON text), which TRL passes to reward functions and
    :func:`trl_reward` turns back into the ``Example``. With ``store``, examples the store does not know
    are refused (the store was presampled on other data) and D_pef prompts are dropped: DPH-RL rolls out
    D_exp only and rehearses D_pef from the store.
    """
    exs = list(examples)
    if store is not None:
        st = store if isinstance(store, ReferenceStore) else ReferenceStore(store)
        unknown = [ex.id for ex in exs if ex.id not in st.pass_rate]
        if unknown:
            raise StoreMismatchError(
                f"reference store {st.path} has no pass rate for {len(unknown)} of {len(exs)} examples "
                f"(first: {unknown[:3]}): it was presampled on other prompts. Re-run `dphrl presample` on "
                "this dataset."
            )
        exp = set(st.exp_ids)
        exs = [ex for ex in exs if ex.id in exp]
        if not exs:
            raise ValueError(
                f"reference store {st.path}: no D_exp prompt among the examples; nothing to explore"
            )
    if not exs:
        raise ValueError("trl_dataset: no examples")
    rows = [
        {
            "prompt": [dict(m) for m in ex.prompt],
            "id": ex.id,
            "answer": ex.answer,
            "gold_sql": ex.gold_sql,
            "db_path": ex.db_path,
            "task": ex.task,
            "meta": json.dumps(ex.meta, sort_keys=True, default=str),
        }
        for ex in exs
    ]
    return Dataset.from_list(rows)
