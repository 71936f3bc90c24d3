"""vLLM generation engine (optional extra ``pip install 'dphrl[vllm]'``, needs a CUDA GPU).

The engine runs in the training process ("colocated"): one ``vllm.LLM`` per process on that process's
GPU, fed token ids (the chat template is applied by us, as for the HF engine) and decoded by our own
tokenizer, so both engines see and return exactly the same tokens. Before the first rollout after an
optimizer update the trainer pushes the policy's weights into it with :meth:`VLLMEngine.sync_weights`
(called by :class:`dphrl.engines.sync.EngineWeights`; LoRA adapters folded in, FSDP / ZeRO-3 shards
gathered first). vLLM's engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set
before the ``LLM`` is built, as ``external_launcher`` does itself): only then is the model reachable
for the weight push (``llm.llm_engine.model_executor.driver_worker.model_runner.model``); with vLLM's
default engine-core subprocess, ``LLMEngine`` has no ``model_executor`` and ``LLM.apply_model`` cannot
ship a closure holding the weights (0.8-0.10: AttributeError; >= 0.26: refused unless
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, and every tensor would be pickled to the other process).

Versions. The attributes, keywords and call paths used here were checked against the source of vLLM
0.8.5.post1, 0.10.2, 0.26.0, 0.32.0 and 0.34.0 (file and line of each: docs/recipes.md, "vLLM:
versions checked"); the ``vllm`` extra pins that range.

Log-probs. vLLM's kernels (bf16, fused sampling) do not reproduce the training forward bit for bit, so
the trainer never trusts an engine's log-probs when the engine is vLLM: it recomputes pi_old with one
no-grad forward of the policy (``old_logprob: recompute``, forced), and ``presample`` recomputes the
stored log pi_ref with the Hugging Face model in fp32 (``Generation.logprobs`` of this engine are
vLLM's own, the processed log-probs of the sampling distribution when vLLM >= 0.10.2 supports
``logprobs_mode``; they are kept for diagnostics only).

Sampling parameters. As for the HF engine, what is sampled is T and top-p as requested and nothing
else: :func:`sampling_params_kwargs` sets every distribution-changing ``SamplingParams`` field to its
neutral value explicitly (top_k -1 = off, min_p 0, presence / frequency penalties 0, repetition
penalty 1, no logit bias or allowed-token list, min_tokens 0, no stop strings), and the engine is
built with ``generation_config="vllm"`` so that vLLM does not take default sampling parameters
(``max_new_tokens`` cap included) from the checkpoint's ``generation_config.json``. vLLM still reads
that file's ``eos_token_id`` list (whatever ``generation_config`` says) and adds it to every request's
stop tokens unless ``ignore_eos``; ``ignore_eos=True`` with ``stop_token_ids=[tokenizer EOS]`` makes
the tokenizer's EOS the only stop, as in the HF engine (a Qwen2.5 checkpoint lists its pad token
``<|endoftext|>`` as an EOS). vLLM >= 0.26 refuses a temperature above 2 (``SamplingParams``).

Seeds. vLLM seeds each request's sampler with the request's ``seed`` and gives the ``n`` samples of a
prompt ``seed + index``; the same ``seed`` on every prompt of a batch would give sample ``i`` of every
prompt the same random stream (correlated samples across prompts). With a ``seed``, prompt ``p`` of
a call gets ``seed + p * n``: every sample of the call has its own stream, and the call is reproducible.

``vllm`` is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable
from typing import Any

import torch

from dphrl.engines.base import Generation
from dphrl.errors import UserError

INSTALL_HINT = (
    "pip install 'dphrl[vllm]' (or pip install vllm) on a machine with a CUDA GPU, or set engine: hf"
)


class VLLMUnavailableError(UserError, RuntimeError):
    """vLLM is not installed or there is no GPU for it; the message says what to do."""


def _import_vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise VLLMUnavailableError(f"config key 'engine': vllm is not installed ({e}). {INSTALL_HINT}") from e


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def vllm_available() -> bool:
    """Whether ``engine: vllm`` can run here (vLLM importable and a CUDA GPU present)."""
    return importlib.util.find_spec("vllm") is not None and _cuda_available()


def sampling_params_kwargs(
    *, n: int, max_new_tokens: int, temperature: float, top_p: float, greedy: bool, seed: int | None,
    eos_id: int | None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams``: T and top-p as requested, every other field that
    changes the distribution or the stopping explicitly neutral (every field exists in vLLM 0.8.5 to 0.34)."""
    return dict(
        n=n,
        temperature=0.0 if greedy else temperature,  # 0: greedy
        top_p=1.0 if greedy else top_p,
        top_k=-1,  # off: 0.8 accepts only -1; >= 0.10 takes 0 or -1 (both mean the whole vocabulary)
        min_p=0.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        logit_bias=None,
        allowed_token_ids=None,
        min_tokens=0,  # EOS never blocked
        max_tokens=max_new_tokens,
        stop=[],  # no stop strings
        stop_token_ids=[eos_id] if eos_id is not None else [],  # the tokenizer's EOS: the only stop
        ignore_eos=True,  # no other EOS (vLLM's, or the checkpoint's eos_token_id list) stops a response
        seed=seed,
        logprobs=0,  # the sampled token's log-prob only
        detokenize=False,
        skip_special_tokens=False,
    )


def _construct_llm(llm_cls: Any, kwargs: dict[str, Any], optional: dict[str, Any]) -> tuple[Any, set[str]]:
    """``llm_cls(**kwargs, **optional)``, dropping the optional keywords this vLLM version rejects.

    A ``TypeError`` naming some of them drops those and retries; one naming none drops them all.
    Returns the engine and the optional keywords it accepted.
    """
    opts = dict(optional)
    while True:
        try:
            return llm_cls(**kwargs, **opts), set(opts)
        except TypeError as e:
            if not opts:
                raise
            named = [k for k in opts if k in str(e)]
            for k in named or list(opts):
                del opts[k]


def _tokens_prompt(vllm: Any, ids: list[int]) -> Any:
    """A token-id prompt in the form this vLLM version accepts."""
    try:
        from vllm.inputs import TokensPrompt  # type: ignore[import-not-found]

        return TokensPrompt(prompt_token_ids=list(ids))
    except ImportError:  # very old versions took a plain dict
        return {"prompt_token_ids": list(ids)}


class VLLMEngine:
    """Sample with ``vllm.LLM.generate`` from token ids; push new weights with :meth:`load_weights`.

    ``model_path`` must be a local directory or hub id vLLM can read (for a GGUF or built-in model,
    the safetensors cache dir that :func:`dphrl.models.ensure_gguf_model_cache` writes). ``llm`` may
    be given directly (an existing ``vllm.LLM``, or a test double with the same methods).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        distributed: bool = False,
        llm: Any = None,
    ):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.vllm = _import_vllm()
        self.exact_logprobs = False
        if llm is None:
            if not _cuda_available():
                raise VLLMUnavailableError(
                    f"config key 'engine': vllm needs a CUDA GPU and none is visible. {INSTALL_HINT}"
                )
            kwargs: dict[str, Any] = dict(
                model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=max_model_len,
            )
            if distributed:  # one engine per training process, inside the existing process group
                kwargs["distributed_executor_backend"] = "external_launcher"
            # the engine core in this process: the only layout whose model the weight push can reach
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            # logprobs_mode (vLLM >= 0.10.2; older: log-probs of the raw logits, before temperature / top-p);
            # generation_config "vllm": vLLM's neutral defaults, never the checkpoint's sampling defaults.
            llm, accepted = _construct_llm(
                self.vllm.LLM, kwargs, {"logprobs_mode": "processed_logprobs", "generation_config": "vllm"}
            )
            self.exact_logprobs = "logprobs_mode" in accepted
        self.llm = llm
        self.weight_pushes = 0

    @classmethod
    def from_model(cls, name_or_path: str, tokenizer: Any, **kw: Any) -> VLLMEngine:
        """An engine for a model as dphrl names it (dir, hub id, .gguf, built-in): GGUF and built-in
        models are read from their safetensors cache (converted once)."""
        from dphrl.models import engine_model_path

        return cls(engine_model_path(name_or_path), tokenizer, **kw)

    # ------------------------------------------------------------------------------------------
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
        def params(prompt_seed: int | None) -> Any:
            return self.vllm.SamplingParams(**sampling_params_kwargs(
                n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                seed=prompt_seed, eos_id=self.eos_id,
            ))

        # one seed base per prompt (vLLM gives the n samples of a prompt seed + index):
        # no two samples share a stream
        per_prompt = params(None) if seed is None else [params(seed + i * n) for i in range(len(prompts))]
        outs = self.llm.generate([_tokens_prompt(self.vllm, p) for p in prompts], per_prompt, use_tqdm=False)
        if len(outs) != len(prompts):
            raise RuntimeError(f"vllm returned {len(outs)} results for {len(prompts)} prompts")
        return [[self._to_generation(p, c) for c in out.outputs] for p, out in zip(prompts, outs)]

    def _to_generation(self, prompt: list[int], c: Any) -> Generation:
        """One vLLM CompletionOutput -> Generation (EOS kept as the last token when the response stopped)."""
        ids = list(c.token_ids)
        lps = [_chosen_logprob(step, tok) for step, tok in zip(c.logprobs or [], ids)]
        if len(lps) != len(ids):
            lps = lps + [float("nan")] * (len(ids) - len(lps))  # never used for training (recomputed)
        finished = c.finish_reason == "stop"
        if finished and (not ids or ids[-1] != self.eos_id) and self.eos_id is not None:
            ids.append(self.eos_id)  # some versions drop the stop token: keep the EOS the policy chose
            lps.append(float("nan"))
        text_ids = ids[:-1] if finished else ids
        return Generation(
            prompt_ids=list(prompt), response_ids=ids, logprobs=lps,
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True), finished=finished,
        )

    # ------------------------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the policy's current weights (LoRA folded in out of place) into the engine."""
        with torch.no_grad():
            self.load_weights(hf_weights_for_engine(model))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights (Hugging Face parameter names) into the vLLM model and drop its prefix cache."""
        weights = list(named_tensors)
        model = _inner_model(self.llm)
        if model is not None:
            model.load_weights(weights)
        elif hasattr(getattr(self.llm, "llm_engine", None), "model_executor") and hasattr(
            self.llm, "apply_model"
        ):
            # in-process engine, model under another attribute path: the worker's own apply_model reaches it
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:
            raise RuntimeError(
                "cannot reach the vLLM model to load the policy's weights into: llm.llm_engine has no "
                "in-process model_executor (was the LLM built with VLLM_ENABLE_V1_MULTIPROCESSING=1?). "
                "VLLMEngine builds it in-process; pass an LLM built that way, or use a vLLM version listed "
                "in docs/recipes.md."
            )
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        self.weight_pushes += 1


def _chosen_logprob(step: Any, tok: int) -> float:
    if step is None or tok not in step:
        return float("nan")
    v = step[tok]
    return float(getattr(v, "logprob", v))


def _inner_model(llm: Any) -> torch.nn.Module | None:
    """The torch model inside a colocated vLLM engine (V0 and in-process V1 layouts), or None.

    ``driver_worker`` is a ``WorkerWrapperBase`` that forwards attributes to its ``worker`` (0.8.5 to 0.34),
    so both paths below reach ``Worker.model_runner.model`` (possibly a CUDA-graph wrapper, which forwards
    ``load_weights`` to the model)."""
    ex = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    worker = getattr(ex, "driver_worker", None)
    for path in (("model_runner", "model"), ("worker", "model_runner", "model")):
        obj = worker
        for a in path:
            obj = getattr(obj, a, None)
        if obj is not None and hasattr(obj, "load_weights"):
            return obj
    return None


def _lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state-dict name of each LoRA-wrapped base weight -> its active adapters' delta (scale * B @ A)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    deltas: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and not getattr(mod, "merged", False):
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    key = f"{name}.base_layer.weight"
                    d = mod.get_delta_weight(adapter)
                    deltas[key] = deltas[key] + d if key in deltas else d
    return deltas


def hf_weights_for_engine(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the policy's full weights under the plain base model's Hugging Face names.

    For a peft LoRA model the adapters are folded in out of place (W + scale * B @ A, the values
    ``merge_and_unload`` gives) without touching the module: merging and unmerging in place after every
    update would add float rounding to the frozen base weights each time (they are the RKL reference).
    Wrapper prefixes (``base_model.model.``, ``.base_layer``) are stripped and the LoRA factors skipped.
    """
    deltas = _lora_deltas(model)
    out = []
    for name, p in model.state_dict().items():
        if "lora_" in name or "original_module" in name:
            continue
        t = p.detach()
        if name in deltas:
            t = t + deltas[name].to(t.dtype)
        name = (
            name.removeprefix("base_model.model.")
            .replace(".base_layer", "")
            .replace("modules_to_save.default.", "")
        )
        out.append((name, t))
    return out
