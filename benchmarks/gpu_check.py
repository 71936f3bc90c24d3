"""One GPU check of dphrl on a Qwen2.5-0.5B-shaped model, prepared to run in one short device session.

A randomly initialised model with Qwen2.5-0.5B's published shape (no download: random weights rounded
to bf16 values, as a bf16 checkpoint holds, and a character tokenizer built locally whose 151,936
entries cover every id the model can sample) goes through these parts, each in its own try/except and
under its own time limit, in this order:

* ``generation``: tokens/s of the dphrl HF engine (``dphrl.engines.build_engine("hf", ...)``, the model in
  the generation dtype: bf16 on a GPU, as ``presample`` / ``eval`` load it) with the shared prompt
  prefill on and off, on the same batch (prompts x rollouts, SQL-shaped prompts of fixed length).
* ``update``: a dphrl ``Trainer`` (grpo, ``dtype`` bf16 autocast on fp32 weights) on random prompts:
  rollout and update phase times, update tokens/s and MFU = 6 * params * tokens forwarded / update
  time / peak bf16 dense FLOP/s of the detected GPU (``PEAK_BF16_TFLOPS``; attention-score FLOPs not
  counted, each group's prompt counted once when the update shares prefixes), peak memory per phase.
* ``store_check``: a few prompts presampled with ``dphrl.reference.presample`` by the bf16 model, then
  ``dphrl.reference.verify_store`` run by the trainer at start-up with its own forward (bf16 autocast):
  mean / max |delta log pi| and whether the mean is within ``STORE_TOLERANCE["bfloat16"]``.
* ``step_grpo``, ``step_dph``, ``step_trl``: one step (rollout + update) of dphrl grpo, dph (js) and
  TRL's ``GRPOTrainer`` on the same workload, by ``benchmarks/step_time.py``'s own workers
  (``run_ours``, ``run_trl``, ``make_store``), given this model and, on a GPU, bf16 autocast for both
  trainers. TRL is optional: not importable -> the part is skipped and says why.

``--budget-s`` bounds the whole run: a part starts only when its minimum (``MIN_S``) fits in what is
left, and is stopped (SIGALRM) when it would eat the minimum of the parts after it. The JSON
(``--out``; default ``$OUT/gpu_check.json`` when ``$OUT`` is set) is rewritten after every part, so a
run killed from outside keeps what was measured. ``--tiny`` runs the same code on a tiny Qwen2 on the
CPU in well under a minute (tests/test_gpu_check.py). ``--fail-part NAME`` makes a part raise at its
start (tests).

    PYTHONPATH=src python benchmarks/gpu_check.py --budget-s 420        # the device run (docs/benchmarks.md)
    PYTHONPATH=src python benchmarks/gpu_check.py --tiny --peak-tflops 1  # CPU smoke run

JSON keys: ``schema``, ``created``, ``wall_s``, ``args``, ``env`` (versions, device, GPU, the peak used
for MFU and which table row), ``model`` (shape, its source, parameter count), ``workload``,
``budget``, ``parts`` (per part: ``status`` ok | error | skipped | timeout, ``seconds``, ``result`` or
``error`` / ``traceback`` or ``reason``) and ``summary`` (the headline numbers, flat; see
:func:`summarize`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402  (benchmarks/step_time.py: the synthetic task, the trainer and TRL workers)

SCHEMA = "dphrl.gpu_check/1"

#: Qwen2.5-0.5B's published shape, https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
#: (hidden_size 896, intermediate_size 4864, num_hidden_layers 24, num_attention_heads 14,
#: num_key_value_heads 2, vocab_size 151936, tie_word_embeddings true, rope_theta 1e6, rms_norm_eps 1e-6,
#: max_position_embeddings 32768, use_sliding_window false): 494,032,768 parameters, the tied embedding
#: counted once.
QWEN25_05B: dict[str, Any] = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    use_sliding_window=False,
    max_window_layers=24,
)
QWEN25_05B_SOURCE = "https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json"
#: ``--tiny``: the same architecture (GQA 2:1, tied embeddings), sized for a CPU test.
TINY: dict[str, Any] = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_window_layers=2)

#: Dense bf16 tensor-core peak FLOP/s (TFLOP/s, no sparsity; NVIDIA datasheets), matched in this order
#: against ``torch.cuda.get_device_name()``: every listed word must appear in it.
PEAK_BF16_TFLOPS: list[tuple[str, tuple[str, ...], float]] = [
    ("H100 PCIe", ("H100", "PCIe"), 756.0),
    ("H100 NVL", ("H100", "NVL"), 835.0),
    ("H100 SXM", ("H100",), 989.0),
    ("H200", ("H200",), 989.0),
    ("A100", ("A100",), 312.0),
]

#: Workloads: prompts x rollouts per step, prompt and response lengths (tokens), micro-batch, steps.
WORKLOADS: dict[str, dict[str, int]] = {
    "gpu": dict(
        prompts=16,
        rollouts=8,
        prompt_tokens=256,
        max_new_tokens=128,
        micro_batch=16,
        warmup=1,
        steps=2,
        gen_reps=2,
        examples=32,
        store_prompts=8,
        store_n=4,
        store_check_tokens=1024,
    ),
    "tiny": dict(
        prompts=2,
        rollouts=4,
        prompt_tokens=48,
        max_new_tokens=8,
        micro_batch=8,
        warmup=1,
        steps=1,
        gen_reps=1,
        examples=8,
        store_prompts=4,
        store_n=4,
        store_check_tokens=64,
    ),
}
PARTS = ("generation", "update", "store_check", "step_grpo", "step_dph", "step_trl")
#: Seconds a part needs at least: estimates for an H100, not measurements (no GPU was lent when written).
MIN_S: dict[str, dict[str, float]] = {
    "gpu": dict(generation=40, update=40, store_check=25, step_grpo=35, step_dph=50, step_trl=60),
    "tiny": dict(generation=1, update=1, store_check=1, step_grpo=1, step_dph=1, step_trl=1),
}

#: Seconds kept back from a part's time limit for the bookkeeping after it (freeing memory, the JSON).
RESERVE_S = 0.5


class PartTimeout(BaseException):
    """Raised by SIGALRM inside a part (a BaseException: library ``except Exception`` does not swallow it)."""


class PartSkipped(Exception):
    """A part that cannot run here (the reason is recorded)."""


# ----------------------------------------------------------------------------------------------
# set-up shared by the parts
# ----------------------------------------------------------------------------------------------
def _torch() -> Any:
    import torch

    return torch


def char_vocab(size: int) -> str:
    """``size`` - 6 distinct characters: step_time's prompt characters first, then code points from U+0100
    (surrogates skipped), so the tokenizer has exactly ``size`` ids and every id decodes."""
    from dphrl.data.tokenizer import SPECIAL_TOKENS

    out = dict.fromkeys(step_time.CHARS)
    c = 0x100
    while len(out) < size - len(SPECIAL_TOKENS):
        if not 0xD800 <= c <= 0xDFFF:
            out.setdefault(chr(c))
        c += 1
    return "".join(out)


def peak_flops(device_name: str | None, override_tflops: float | None) -> dict[str, Any]:
    """The bf16 dense peak used for MFU: ``--peak-tflops`` if given, else the first matching table row."""
    if override_tflops:
        return {"tflops": float(override_tflops), "row": "--peak-tflops", "device_name": device_name}
    for row, words, tflops in PEAK_BF16_TFLOPS:
        if device_name and all(w in device_name for w in words):
            return {"tflops": tflops, "row": row, "device_name": device_name}
    return {"tflops": None, "row": None, "device_name": device_name,
            "reason": "device not in PEAK_BF16_TFLOPS: MFU not computed (pass --peak-tflops)"}


class Check:
    """Arguments, device, tokenizer, model builder, budget and results of one run."""

    def __init__(self, args: argparse.Namespace):
        torch = _torch()
        self.args = args
        self.mode = "tiny" if args.tiny else "gpu"
        self.w = dict(WORKLOADS[self.mode])
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = args.dtype or ("bfloat16" if self.cuda else "float32")
        # generation / presample model dtype (as presample loads it)
        self.gen_dtype = getattr(torch, self.dtype)
        self.shape = dict(TINY if args.tiny else QWEN25_05B)
        self.seed = args.seed
        self.threads = args.threads
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.workdir = Path(tempfile.mkdtemp(prefix="dphrl-gpu-check-"))
        self._tok: Any = None
        self.n_params: int | None = None
        name = torch.cuda.get_device_name(0) if self.cuda else None
        self.peak = peak_flops(name, args.peak_tflops)
        self.parts: dict[str, dict[str, Any]] = {}

    @property
    def tok(self) -> Any:
        """The character tokenizer (built once): ``vocab_size`` ids, pad 0, eos 1."""
        if self._tok is None:
            from dphrl.data.tokenizer import build_char_tokenizer

            self._tok = build_char_tokenizer(char_vocab(self.shape["vocab_size"]))
            step_time._register_reward()
        return self._tok

    def build_model(self, seed: int) -> Any:
        """A fresh random Qwen2 of ``self.shape`` on the device, fp32 weights holding bf16 values."""
        torch = _torch()
        from transformers import AutoModelForCausalLM, Qwen2Config

        shape = dict(self.shape)
        if "rope_parameters" in inspect.signature(Qwen2Config.__init__).parameters:  # transformers >= 5
            shape["rope_parameters"] = {"rope_type": "default", "rope_theta": shape.pop("rope_theta")}
        tok = self.tok
        cfg = Qwen2Config(**shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id)
        torch.manual_seed(seed)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(cfg)
        model = model.float()
        with torch.no_grad():  # bf16 values, like a bf16 checkpoint loaded in fp32: one fingerprint for both
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        self.n_params = sum(p.numel() for p in model.parameters())
        return model

    def examples(self, n: int, pef_frac: float) -> list:
        """step_time's synthetic task: SQL-shaped prompts of exactly ``prompt_tokens`` tokens."""
        return step_time.build_examples(n, pef_frac, self.w["prompt_tokens"], self.tok)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _sync() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mem_reset() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _mem_peak_mb() -> float:
    """Peak CUDA memory allocated since the last reset (MB); on the CPU the process's peak RSS so far."""
    torch = _torch()
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return step_time._peak_rss_mb()


def _free() -> None:
    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _swap(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def step_time_on(ck: Check, trl_module: Any = None) -> Iterator[dict[str, list]]:
    """step_time's workers with this check's tokenizer, examples and model, and its dtype: ``_setup``
    replaced, ``TrainConfig`` given ``dtype`` and, with bf16, TRL's ``GRPOConfig`` ``bf16=True`` (step_time
    itself runs both trainers in fp32 on the CPU). Yields what the trainers were built with."""
    import dphrl.config
    import dphrl.trainer  # noqa: F401  (every module binds the real TrainConfig before the swap below)

    def setup(spec: dict) -> tuple[Any, list, Any]:
        if spec.get("threads"):
            _torch().set_num_threads(spec["threads"])
        step_time._register_reward()
        return ck.tok, ck.examples(spec["examples"], spec["pef_frac"]), ck.build_model(spec["seed"])

    real_cfg = dphrl.config.TrainConfig
    seen: dict[str, list] = {"dphrl_dtype": [], "trl_bf16": []}

    def train_config(**kw: Any) -> Any:
        cfg = real_cfg(**{"dtype": ck.dtype, **kw})
        seen["dphrl_dtype"].append(cfg.dtype)
        return cfg

    with contextlib.ExitStack() as stack:
        stack.enter_context(_swap(step_time, "_setup", setup))
        stack.enter_context(_swap(dphrl.config, "TrainConfig", train_config))
        if trl_module is not None and ck.dtype == "bfloat16":
            real_grpo = trl_module.GRPOConfig

            def grpo_config(**kw: Any) -> Any:
                cfg = real_grpo(**{**kw, "bf16": True})
                seen["trl_bf16"].append(cfg.bf16)
                return cfg

            stack.enter_context(_swap(trl_module, "GRPOConfig", grpo_config))
        yield seen


def _spec(ck: Check, name: str) -> dict[str, Any]:
    """A step_time worker spec for this check's workload."""
    w = ck.w
    return dict(
        name=name,
        round=0,
        steps=w["steps"],
        warmup=w["warmup"],
        prompts=w["prompts"],
        rollouts=w["rollouts"],
        max_new_tokens=w["max_new_tokens"],
        temperature=1.0,
        lr=1e-6,
        micro_batch=w["micro_batch"],
        gen_batch=w["prompts"] * w["rollouts"],
        examples=w["examples"],
        pef_frac=0.25,
        ref_prompts=0,
        seed=ck.seed,
        threads=ck.threads,
        workdir=str(ck.workdir),
        store=str(ck.workdir / "store-steps"),
        prompt_tokens=w["prompt_tokens"],
        max_positions=w["prompt_tokens"] + w["max_new_tokens"] + 8,
    )


# ----------------------------------------------------------------------------------------------
# the parts
# ----------------------------------------------------------------------------------------------
def part_generation(ck: Check) -> dict[str, Any]:
    """HF engine tokens/s with the shared prompt prefill on and off (same prompts, alternating order)."""
    from dphrl.data.chat import encode_prompt
    from dphrl.engines import build_engine

    w = ck.w
    n, batch = w["rollouts"], w["prompts"] * w["rollouts"]
    model = ck.build_model(ck.seed).to(ck.gen_dtype).eval()
    prompts = [encode_prompt(ck.tok, ex.prompt) for ex in ck.examples(w["prompts"], 0.0)]
    engines = {flag: build_engine("hf", model, ck.tok, batch_size=batch, share_prefix=flag == "shared")
               for flag in ("shared", "unshared")}
    for eng in engines.values():  # warm-up: kernels, allocator, caches (not timed)
        eng.generate(prompts, n, max_new_tokens=min(8, w["max_new_tokens"]), temperature=1.0, seed=0)
    times: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, int] = {}
    peaks: dict[str, float] = dict.fromkeys(engines, 0.0)
    for r in range(w["gen_reps"]):
        for key in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            _mem_reset()
            _sync()
            t = time.perf_counter()
            gens = engines[key].generate(
                prompts, n, max_new_tokens=w["max_new_tokens"], temperature=1.0, seed=r + 1
            )
            _sync()
            times[key].append(time.perf_counter() - t)
            tokens[key] = sum(len(g.response_ids) for gs in gens for g in gs)
            peaks[key] = max(peaks[key], _mem_peak_mb())
    configs = {}
    for key in engines:
        sec = statistics.median(times[key])
        configs[key] = {"seconds": sec, "times": times[key], "generated_tokens": tokens[key],
                        "tokens_per_s": tokens[key] / sec, "peak_mem_mb": peaks[key]}
    return {
        "dtype": str(ck.gen_dtype).removeprefix("torch."),
        "prompts": w["prompts"],
        "rollouts": n,
        "prompt_tokens": w["prompt_tokens"],
        "max_new_tokens": w["max_new_tokens"],
        "reps": w["gen_reps"],
        "configs": configs,
        "shared_speedup": configs["unshared"]["seconds"] / configs["shared"]["seconds"],
    }


def part_update(ck: Check) -> dict[str, Any]:
    """A grpo Trainer: per step rollout / update time and peak memory; update tokens/s and MFU."""
    from dphrl.config import TrainConfig
    from dphrl.trainer import Trainer

    w = ck.w
    total = w["warmup"] + w["steps"]
    cfg = TrainConfig(
        model=step_time.MODEL_NAME,
        algorithm="grpo",
        reward=step_time.REWARD_NAME,
        seed=ck.seed,
        prompts_per_step=w["prompts"],
        rollout_n=w["rollouts"],
        max_new_tokens=w["max_new_tokens"],
        temperature=1.0,
        lr=1e-6,
        max_steps=total,
        micro_batch_size=w["micro_batch"],
        generation_batch_size=w["prompts"] * w["rollouts"],
        output_dir=str(ck.workdir / "run-update"),
        progress=False,
        max_prompt_tokens=max(512, w["prompt_tokens"]),
        dtype=ck.dtype,
    )
    model = ck.build_model(ck.seed)
    n_params = sum(p.numel() for p in model.parameters())
    _mem_reset()
    tr = Trainer(cfg, model=model, tokenizer=ck.tok, examples=ck.examples(w["examples"], 0.0))
    t_gen = tr.engine.generate = step_time.Timer(tr.engine.generate, _sync)
    t_bwd = tr.acc.backward = step_time.Timer(tr.acc.backward, _sync)
    t_opt = tr.optimizer.step = step_time.Timer(tr.optimizer.step, _sync)
    steps = []
    for i in range(total):
        _mem_reset()
        _sync()
        t0 = time.perf_counter()
        rollouts, _ = tr.collect_rollouts()
        refs = tr.reference_batch()
        _sync()
        t1 = time.perf_counter()
        roll_peak = _mem_peak_mb()
        _mem_reset()
        tr.update(rollouts, refs)
        _sync()
        t2 = time.perf_counter()
        tr.step += 1
        prompts = {tuple(s.prompt_ids) for s in rollouts}
        prompt_fwd = (sum(len(p) for p in prompts) if tr.share_prefix
                      else sum(len(s.prompt_ids) for s in rollouts))
        steps.append({"warmup": i < w["warmup"], "rollout_s": t1 - t0, "update_s": t2 - t1,
                      "generate_s": t_gen.take(), "backward_s": t_bwd.take(), "optimizer_s": t_opt.take(),
                      "response_tokens": sum(len(s.response_ids) for s in rollouts),
                      "prompt_tokens_forwarded": prompt_fwd, "peak_mem_rollout_mb": roll_peak,
                      "peak_mem_update_mb": _mem_peak_mb()})
    meas = [s for s in steps if not s["warmup"]]

    def med(k: str) -> float:
        return statistics.median(s[k] for s in meas)

    upd_s = med("update_s")
    fwd_tokens = med("response_tokens") + med("prompt_tokens_forwarded")
    flops = 6.0 * n_params * fwd_tokens
    peak = ck.peak["tflops"]
    return {
        "algorithm": "grpo",
        "dtype": ck.dtype,
        "n_params": n_params,
        "share_prefix": bool(tr.share_prefix),
        "rollout_s": med("rollout_s"),
        "generate_s": med("generate_s"),
        "update_s": upd_s,
        "backward_s": med("backward_s"),
        "optimizer_s": med("optimizer_s"),
        "response_tokens": med("response_tokens"),
        "tokens_forwarded": fwd_tokens,
        "update_tokens_per_s": med("response_tokens") / upd_s,
        "forwarded_tokens_per_s": fwd_tokens / upd_s,
        "model_flops_per_update": flops,
        "achieved_tflops": flops / upd_s / 1e12,
        "mfu": flops / upd_s / (peak * 1e12) if peak else None,
        "peak_tflops": peak,
        "peak_row": ck.peak["row"],
        "peak_mem_rollout_mb": max(s["peak_mem_rollout_mb"] for s in steps),
        "peak_mem_update_mb": max(s["peak_mem_update_mb"] for s in steps),
        "steps": steps,
    }


def part_store_check(ck: Check) -> dict[str, Any]:
    """Presample with the model in the generation dtype, then the trainer's own store verification."""
    from dphrl.config import TrainConfig
    from dphrl.engines import build_engine
    from dphrl.models import tokenizer_hash
    from dphrl.reference import STORE_TOLERANCE, presample, store_tolerance
    from dphrl.trainer import Trainer

    w = ck.w
    examples = ck.examples(w["store_prompts"], 0.5)  # half always right: they become D_pef, all kept
    model = ck.build_model(ck.seed)
    sampler = copy.deepcopy(model).to(ck.gen_dtype).eval()
    store = ck.workdir / "store-check"
    _mem_reset()
    t = time.perf_counter()
    manifest = presample(
        build_engine("hf", sampler, ck.tok, batch_size=len(examples) * w["store_n"]), ck.tok, examples,
        step_time.bench_reward, store, model_name=step_time.MODEL_NAME, tokenizer_hash=tokenizer_hash(ck.tok),
        n=w["store_n"], temperature=1.0, max_new_tokens=w["max_new_tokens"], threshold=1.0, seed=ck.seed,
        prompts_per_call=len(examples), progress=False,
    )
    presample_s, presample_peak = time.perf_counter() - t, _mem_peak_mb()
    del sampler
    _free()
    cfg = TrainConfig(
        model=step_time.MODEL_NAME,
        algorithm="dph",
        reward=step_time.REWARD_NAME,
        reference_store=str(store),
        store_check_tokens=w["store_check_tokens"],
        store_check_tolerance=1e9,  # measured here, judged below
        dtype=ck.dtype,
        seed=ck.seed,
        prompts_per_step=1,
        rollout_n=w["store_n"],
        max_new_tokens=w["max_new_tokens"],
        temperature=1.0,
        max_steps=1,
        micro_batch_size=w["micro_batch"],
        output_dir=str(ck.workdir / "run-store"),
        progress=False,
        max_prompt_tokens=max(512, w["prompt_tokens"]),
    )
    _mem_reset()
    t = time.perf_counter()
    tr = Trainer(cfg, model=model, tokenizer=ck.tok, examples=examples)  # verify_store runs here
    verify_s, verify_peak = time.perf_counter() - t, _mem_peak_mb()
    stats = tr.store_check
    mean, worst = stats["store_check/mean_abs_diff"], stats["store_check/max_abs_diff"]
    tol = store_tolerance(str(manifest["dtype"]), ck.dtype)
    return {
        "store_dtype": manifest["dtype"],
        "train_dtype": ck.dtype,
        "stored_samples": manifest["counts"]["stored_samples"],
        "tokens": stats["store_check/tokens"],
        "mean_abs_dlogp": mean,
        "max_abs_dlogp": worst,
        "tolerance": tol,
        "within_tolerance": mean <= tol,
        "bf16_tolerance": STORE_TOLERANCE["bfloat16"],
        "within_bf16_tolerance": mean <= STORE_TOLERANCE["bfloat16"],
        "presample_s": presample_s,
        "verify_s": verify_s,
        "peak_mem_presample_mb": presample_peak,
        "peak_mem_verify_mb": verify_peak,
    }


def _step_result(res: dict[str, Any], name: str) -> dict[str, Any]:
    row = step_time.summarize(name, [res])
    return {"summary": row, "steps": res["steps"], "memory": res["memory"],
            "peak_mem_mb": res["memory"].get("cuda_peak_mb", res["memory"]["peak_rss_mb"])}


def part_step(ck: Check, name: str) -> dict[str, Any]:
    """step_time.run_ours on this model (``dph-js``: after step_time.make_store on the same examples)."""
    spec = _spec(ck, name)
    with step_time_on(ck) as seen:
        store = None
        if name.startswith("dph"):
            t = time.perf_counter()
            manifest = step_time.make_store(spec)
            store = {"seconds": time.perf_counter() - t, **manifest["counts"]}
            _free()
        res = step_time.run_ours(spec)
    return {**_step_result(res, name), "store": store, "built_with": seen}


def part_trl(ck: Check) -> dict[str, Any]:
    """step_time.run_trl (TRL's GRPOTrainer, beta 0, no vLLM) on this model; skipped without TRL."""
    try:
        import datasets  # noqa: F401  (GRPOTrainer's dataset)
        import trl
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        raise PartSkipped(
            f"TRL not importable here ({type(e).__name__}: {e}); carry trl and datasets as wheels "
            "(docs/benchmarks.md, 'GPU check')"
        ) from e
    spec = _spec(ck, "trl")
    with step_time_on(ck, trl_module=trl) as seen:
        res = step_time.run_trl(spec)
    return {**_step_result(res, "trl"), "trl_version": trl.__version__, "built_with": seen}


RUNNERS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "generation": part_generation,
    "update": part_update,
    "store_check": part_store_check,
    "step_grpo": lambda ck: part_step(ck, "grpo"),
    "step_dph": lambda ck: part_step(ck, "dph-js"),
    "step_trl": part_trl,
}


# ----------------------------------------------------------------------------------------------
# running, recording, summarizing
# ----------------------------------------------------------------------------------------------
def _on_alarm(signum: int, frame: Any) -> None:
    raise PartTimeout()


def run_part(ck: Check, name: str, later: list[str]) -> dict[str, Any]:
    """Run one part under its time limit; never raises (the outcome is the returned record)."""
    mins = MIN_S[ck.mode]
    left = ck.left()
    if left < mins[name]:
        return {"status": "skipped", "seconds": 0.0,
                "reason": f"budget: {left:.0f} s left of --budget-s {ck.args.budget_s:g}, the part needs "
                          f">= {mins[name]:g} s"}
    limit = max(mins[name], left - sum(mins[p] for p in later) - RESERVE_S)
    rec: dict[str, Any] = {"limit_s": limit}
    t = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        if name in ck.args.fail_part:
            raise RuntimeError(f"deliberate failure of part {name!r} (--fail-part)")
        rec.update(status="ok", result=RUNNERS[name](ck))
    except PartTimeout:
        rec.update(status="timeout", error=f"stopped after {limit:.0f} s (its share of --budget-s)")
    except PartSkipped as e:
        rec.update(status="skipped", reason=str(e))
    except Exception as e:
        rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    rec["seconds"] = time.perf_counter() - t
    _free()
    return rec


def _get(parts: dict[str, Any], name: str, *keys: str) -> Any:
    obj = parts.get(name, {})
    if obj.get("status") != "ok":
        return None
    obj = obj["result"]
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def summarize(parts: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, flat (None where the part did not run)."""
    s: dict[str, Any] = {
        "gen_tokens_per_s_shared": _get(parts, "generation", "configs", "shared", "tokens_per_s"),
        "gen_tokens_per_s_unshared": _get(parts, "generation", "configs", "unshared", "tokens_per_s"),
        "gen_shared_speedup": _get(parts, "generation", "shared_speedup"),
        "update_tokens_per_s": _get(parts, "update", "update_tokens_per_s"),
        "update_forwarded_tokens_per_s": _get(parts, "update", "forwarded_tokens_per_s"),
        "update_achieved_tflops": _get(parts, "update", "achieved_tflops"),
        "mfu": _get(parts, "update", "mfu"),
        "store_mean_abs_dlogp": _get(parts, "store_check", "mean_abs_dlogp"),
        "store_max_abs_dlogp": _get(parts, "store_check", "max_abs_dlogp"),
        "store_within_bf16_tolerance": _get(parts, "store_check", "within_bf16_tolerance"),
    }
    for part, key in (("step_grpo", "grpo"), ("step_dph", "dph"), ("step_trl", "trl")):
        med = _get(parts, part, "summary", "median") or {}
        s[f"step_s_{key}"] = med.get("step_s")
        s[f"update_s_{key}"] = med.get("update_s")
        s[f"rollout_s_{key}"] = med.get("rollout_s")
    s["grpo_vs_trl_step"] = _ratio(s["step_s_grpo"], s["step_s_trl"])
    s["grpo_vs_trl_update"] = _ratio(s["update_s_grpo"], s["update_s_trl"])
    s["dph_vs_grpo_step"] = _ratio(s["step_s_dph"], s["step_s_grpo"])
    peaks = {
        "generation_shared": _get(parts, "generation", "configs", "shared", "peak_mem_mb"),
        "generation_unshared": _get(parts, "generation", "configs", "unshared", "peak_mem_mb"),
        "update_rollout": _get(parts, "update", "peak_mem_rollout_mb"),
        "update_update": _get(parts, "update", "peak_mem_update_mb"),
        "store_presample": _get(parts, "store_check", "peak_mem_presample_mb"),
        "store_verify": _get(parts, "store_check", "peak_mem_verify_mb"),
        "step_grpo": _get(parts, "step_grpo", "peak_mem_mb"),
        "step_dph": _get(parts, "step_dph", "peak_mem_mb"),
        "step_trl": _get(parts, "step_trl", "peak_mem_mb"),
    }
    s.update({f"peak_mem_mb_{k}": v for k, v in peaks.items()})
    return s


def environment(ck: Check) -> dict[str, Any]:
    """Versions, device and the MFU peak."""
    torch = _torch()
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "device": ck.device, "dtype": ck.dtype, "threads": torch.get_num_threads(),
                           "peak_flops": ck.peak}
    from importlib import metadata

    for dist in ("transformers", "accelerate", "peft", "pyarrow", "trl", "datasets"):
        try:  # the installed version, without importing it
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    if ck.cuda:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_mb"] = props.total_memory / 2**20
        env["gpu_count"] = torch.cuda.device_count()
    return env


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def table(report: dict[str, Any]) -> str:
    """A short plain-text table: one line per part, then the ratios."""
    parts, s = report["parts"], report["summary"]
    peak = report["env"]["peak_flops"]
    lines = [f"GPU check: {report['model']['n_params'] or 0:,} params ({report['model']['name']}), device "
             f"{report['env'].get('gpu') or report['env']['device']}, dtype {report['env']['dtype']}",
             f"{'part':<12} {'status':<8} {'s':>6}  result"]
    res = {
        "generation": f"HF engine {_fmt(s['gen_tokens_per_s_shared'], '.0f')} tok/s shared prefill, "
        f"{_fmt(s['gen_tokens_per_s_unshared'], '.0f')} unshared (x{_fmt(s['gen_shared_speedup'], '.2f')}); "
        f"peak {_fmt(s['peak_mem_mb_generation_shared'], '.0f')} MB",
        "update": f"{_fmt(s['update_tokens_per_s'], '.0f')} response tok/s in the update, "
        f"{_fmt(s['update_achieved_tflops'], '.1f')} TFLOP/s, MFU {_fmt(s['mfu'], '.1%')} of "
        f"{_fmt(peak['tflops'], '.0f')} ({peak['row']}); peak rollout "
        f"{_fmt(s['peak_mem_mb_update_rollout'], '.0f')} / update "
        f"{_fmt(s['peak_mem_mb_update_update'], '.0f')} MB",
        "store_check": f"mean |dlogp| {_fmt(s['store_mean_abs_dlogp'], '.2e')}, "
        f"max {_fmt(s['store_max_abs_dlogp'], '.2e')}; "
        f"within bf16 tolerance: {s['store_within_bf16_tolerance']}",
        "step_grpo": f"step {_fmt(s['step_s_grpo'])} s (rollout {_fmt(s['rollout_s_grpo'])}, "
        f"update {_fmt(s['update_s_grpo'])}); "
        f"peak {_fmt(s['peak_mem_mb_step_grpo'], '.0f')} MB",
        "step_dph": f"step {_fmt(s['step_s_dph'])} s (rollout {_fmt(s['rollout_s_dph'])}, "
        f"update {_fmt(s['update_s_dph'])}); "
        f"peak {_fmt(s['peak_mem_mb_step_dph'], '.0f')} MB",
        "step_trl": f"step {_fmt(s['step_s_trl'])} s (rollout {_fmt(s['rollout_s_trl'])}, "
        f"update {_fmt(s['update_s_trl'])}); "
        f"peak {_fmt(s['peak_mem_mb_step_trl'], '.0f')} MB",
    }
    for name, rec in parts.items():
        msg = res[name] if rec["status"] == "ok" else (rec.get("reason") or rec.get("error") or "")
        lines.append(f"{name:<12} {rec['status']:<8} {rec['seconds']:>6.1f}  {msg}")
    lines.append(
        f"grpo / TRL step {_fmt(s['grpo_vs_trl_step'], '.2f')}, update "
        f"{_fmt(s['grpo_vs_trl_update'], '.2f')}; dph / grpo step {_fmt(s['dph_vs_grpo_step'], '.2f')}"
    )
    return "\n".join(lines)


def default_out() -> str:
    out = os.environ.get("OUT")
    return str(Path(out) / "gpu_check.json") if out else "runs/gpu_check/gpu_check.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=420.0, help="time for all parts together (s)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen2 and workload: the same code on the CPU")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {list(PARTS)}")
    ap.add_argument("--fail-part", default="", help="comma list of parts that raise at their start (tests)")
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="training dtype (bf16 autocast) and generation dtype; default bfloat16 on CUDA, else float32",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: by GPU name)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument(
        "--out", default=None, help="the JSON (default $OUT/gpu_check.json, else runs/gpu_check/)"
    )
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.fail_part = {p.strip() for p in args.fail_part.split(",") if p.strip()}
    unknown = (set(args.parts) | args.fail_part) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; parts: {list(PARTS)}")
    args.out = args.out or default_out()
    return args


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch = _torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.tiny and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU visible; the full check needs one (use --tiny on the CPU)",
            file=sys.stderr,
        )
        return 2
    ck = Check(args)
    out = Path(args.out)
    report: dict[str, Any] = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": 0.0,
        "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
        "env": environment(ck),
        "model": {"name": "tiny Qwen2" if args.tiny else "Qwen2.5-0.5B-shaped, random weights",
                  "shape": ck.shape, "source": QWEN25_05B_SOURCE, "n_params": None},
        "workload": ck.w, "budget": {"budget_s": args.budget_s, "min_s": MIN_S[ck.mode]},
        "parts": {}, "summary": {}, "out": str(out),
    }
    order = [p for p in PARTS if p in args.parts]
    try:
        for i, name in enumerate(order):
            print(f"gpu_check: {name} ({ck.left():.0f} s of the budget left)", flush=True)
            rec = run_part(ck, name, order[i + 1:])
            report["parts"][name] = rec
            report["model"]["n_params"] = ck.n_params
            report["summary"] = summarize(report["parts"])
            report["wall_s"] = time.perf_counter() - ck.t0
            _write(out, report)
            detail = rec.get("reason") or rec.get("error") or ""
            print(
                f"gpu_check: {name} {rec['status']} in {rec['seconds']:.1f} s {detail}".rstrip(), flush=True
            )
    finally:
        shutil.rmtree(ck.workdir, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - ck.t0
    _write(out, report)
    print(table(report))
    bad = [n for n, r in report["parts"].items() if r["status"] in ("error", "timeout")]
    print(f"wrote {out} ({report['wall_s']:.0f} s; {len(bad)} part(s) failed: {bad})")
    return 0


def finite_numbers(obj: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every int / float in a JSON-like object with its path (bools excluded), for checks."""
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        yield path, float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from finite_numbers(v, f"{path}[{i}]")


def all_finite(obj: Any) -> bool:
    """True when every number in ``obj`` is finite."""
    return all(math.isfinite(v) for _, v in finite_numbers(obj))


if __name__ == "__main__":
    sys.exit(main())
