"""``dphrl train --dry-run``: check a recipe and print its plan without GPUs and without loading weights.

:func:`dry_run` resolves every config key, resolves the model and reads its size (from a local
``config.json`` with a meta-device model, from the GGUF cache, or from the :data:`KNOWN_MODELS`
table for hub ids that are not available offline), builds the data pipeline on a few examples
(a dataset that is absent on this machine is reported, not fatal), checks the reward and, for
``dph``, the reference store, and prints the batch plan and an estimate of the memory each device
needs (:func:`estimate_memory`, formula in its docstring and in ``docs/recipes.md``).

Standalone, with the launch layout given explicitly::

    python -m dphrl.dryrun --config recipes/bird_llama31_8b_dph_js.yaml --num-processes 8 --sharding fsdp

Under ``accelerate launch`` the layout is read from the environment (``WORLD_SIZE``,
``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``).

Launch refusals and warnings come from :func:`dphrl.launch.check_launch`, the function the
trainer calls at start-up, so a plan the dry run accepts is one the trainer starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from dphrl.config import ConfigError, TrainConfig
from dphrl.data.example import Example
from dphrl.launch import SHARDINGS, Launch, check_launch
from dphrl.memory import (  # noqa: F401 - names the dry run's users import from here
    KNOWN_MODELS,
    GiB,
    MemoryEstimate,
    ModelInfo,
    _count,
    _count_params,
    _fits,
    _gib,
    activation_factor,
    estimate_memory,
    known_model,
    lora_param_formula,
    memory_for,
    model_info,
)

# --------------------------------------------------------------------------------------------------
# Data, reward, reference store


def _load_sample(cfg: TrainConfig, limit: int) -> tuple[list[Example] | None, str | None]:
    """A few examples of the training data, or (None, why) when the data is absent on this machine."""
    from dphrl.data.loaders import load_dataset_spec
    from dphrl.tasks import find_task

    spec = dict(cfg.dataset)
    if not spec:
        raise ConfigError("config key 'dataset': empty; give a spec such as {type: gsm8k, path: ...}")
    task = find_task(spec.get("type"))
    if task is not None and task.seeded:  # a generator: a preview may take its first examples only
        spec["limit"] = min(int(spec.get("limit") or limit), limit)
    elif spec.get("seed") is None:  # with a seed the loader shuffles everything first: keep the user's limit
        spec["limit"] = min(int(spec["limit"]), limit) if spec.get("limit") is not None else limit
    try:
        return load_dataset_spec(spec), None
    except FileNotFoundError as e:
        return None, str(e)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"config key 'dataset': {e}") from e


def _store_report(cfg: TrainConfig) -> tuple[list[str], dict | None]:
    lines: list[str] = []
    if not cfg.reference_store:
        return ["reference_store: not set"], None
    mf = Path(cfg.reference_store) / "manifest.json"
    if not mf.is_file():
        lines.append(f"reference_store: {cfg.reference_store} -- NOT FOUND (create it with "
                     f"`dphrl presample --config <this recipe>`; training refuses to start without it)")
        return lines, None
    m = json.loads(mf.read_text())
    c = m.get("counts", {})
    lines.append(
        f"reference_store: {cfg.reference_store} -- found: {c.get('prompts')} prompts, D_pef "
        f"{c.get('d_pef')}, D_exp {c.get('d_exp')}, {c.get('stored_samples')} stored samples, "
        f"mean pass rate {m.get('mean_pass_rate', float('nan')):.3f}"
    )
    from dphrl.reference import STORE_VERSION

    lines.append(
        f"  sampled from {m.get('model')!r} (weights fingerprint {m.get('model_fingerprint')}: the trainer "
        f"compares it with the loaded model's and re-scores {cfg.store_check_tokens} stored tokens at "
        "start-up)"
    )
    if m.get("store_version") != STORE_VERSION:
        lines.append(
            f"  MISMATCH: store_version {m.get('store_version')} != {STORE_VERSION} (re-run `dphrl "
            "presample`)"
        )
    sampling = m.get("sampling", {})
    for key, want in (("temperature", cfg.temperature), ("top_p", cfg.top_p)):
        got = sampling.get(key)
        if got is not None and abs(float(got) - want) > 1e-9:
            lines.append(f"  MISMATCH: store sampling.{key} {got} != config {key} {want}")
    if m.get("threshold") is not None and abs(float(m["threshold"]) - cfg.split_threshold) > 1e-9:
        lines.append(
            f"  note: store split threshold {m['threshold']} != config split_threshold {cfg.split_threshold}"
        )
    return lines, m


def _launch_env() -> tuple[int | None, str | None]:
    """World size and sharding from an ``accelerate launch`` / ``torchrun`` environment, if any."""
    ws = os.environ.get("WORLD_SIZE")
    world = int(ws) if ws and ws.isdigit() else None
    sharding = None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        sharding = "fsdp"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        sharding = "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3" else "ddp"
    elif world and world > 1:
        sharding = "ddp"
    return world, sharding


# --------------------------------------------------------------------------------------------------
# The dry run


class _Plan:
    """The dry run's text, built section by section, and its warnings."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.warn: list[str] = []

    def section(self, title: str) -> None:
        self.out += ["", f"== {title} =="]

    def text(self) -> str:
        self.section("warnings")
        self.out += [f"- {w}" for w in self.warn] if self.warn else ["none"]
        self.out += ["", "dry run OK" + (" (with warnings)" if self.warn else "")]
        return "\n".join(self.out)


def dry_run(
    cfg: TrainConfig,
    *,
    examples_limit: int = 8,
    world_size: int | None = None,
    sharding: str | None = None,
    load_tokenizer: bool = True,
) -> str:
    """Validate ``cfg`` without GPUs or weights and return the plan as text (see the module docstring).

    ``world_size``/``sharding`` (none | ddp | fsdp | zero3) describe the launch; by default they come
    from the launch environment, else 1 process. The memory table always also shows 1 device and
    DDP / FSDP over ``max(world_size, 8)`` devices for comparison. Raises :class:`ConfigError` for a
    bad dataset option or reward; a dataset or reference store that is absent here is reported.
    """
    from dphrl.engines import resolve_engine

    env_world, env_sharding = _launch_env()
    world = world_size or env_world or 1
    shard = sharding or env_sharding or ("ddp" if world > 1 else "none")
    if shard not in SHARDINGS:
        raise ConfigError(f"sharding must be one of {SHARDINGS}, got {shard!r}")
    launch = Launch(world_size=world, sharding=shard, engine=resolve_engine(cfg.engine),
                    engine_was_auto=cfg.engine == "auto")
    plan = _Plan()
    plan.out.append(f"dphrl dry run: algorithm {cfg.algorithm}, model {cfg.model}")
    _config_section(plan, cfg)
    info = _model_section(plan, cfg)
    _data_section(plan, cfg, examples_limit, load_tokenizer)
    store = _reference_section(plan, cfg)
    _batch_plan_section(plan, cfg, launch, store)
    _memory_section(plan, cfg, info, launch)
    checks = check_launch(cfg, launch)
    plan.warn += [f"REFUSED at start-up: {e}" for e in checks.errors] + checks.warnings
    return plan.text()


def _config_section(plan: _Plan, cfg: TrainConfig) -> None:
    plan.section("resolved config (every key; algorithm defaults filled)")
    plan.out.append(
        yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=120).rstrip()
    )


def _model_section(plan: _Plan, cfg: TrainConfig) -> ModelInfo | None:
    plan.section("model")
    notes: list[str] = []
    info = model_info(cfg, notes)
    plan.out.extend(notes)
    plan.warn.extend(n for n in notes if n.startswith("MODEL NOT FOUND"))
    if info is None:
        plan.warn.append("model size unknown: no memory estimate")
        return None
    plan.out.append(
        f"{info.name}: {_count(info.n_params)} parameters ({info.n_params:,}), source {info.source}, "
        f"size from {info.where}"
    )
    plan.out.append(
        f"  hidden {info.hidden}, layers {info.layers}, intermediate {info.intermediate}, heads "
        f"{info.heads} (kv {info.kv_heads}), vocab {info.vocab}, max positions {info.max_positions}"
    )
    if cfg.lora:
        lp = info.lora_params.get(cfg.lora_target_modules, 0)
        plan.out.append(
            f"  LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {cfg.lora_target_modules}: {_count(lp)} "
            f"trainable parameters ({100 * lp / max(1, info.n_params):.2f}%)"
        )
    else:
        plan.out.append("  full fine-tuning: every parameter is trained")
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    if info.max_positions and seq > info.max_positions:
        plan.warn.append(
            f"max_prompt_tokens + max_new_tokens = {seq} > the model's max positions {info.max_positions}"
        )
    return info


def _data_section(plan: _Plan, cfg: TrainConfig, examples_limit: int, load_tokenizer: bool) -> None:
    """A few training examples, their prompt lengths, and the reward they are scored with."""
    plan.section("data")
    examples, missing = _load_sample(cfg, examples_limit)
    spec_s = json.dumps(cfg.dataset)
    if examples is None:
        plan.out.append(f"dataset {spec_s}")
        plan.out.append(f"  DATA MISSING on this machine: {missing}")
        plan.out.append("  (the rest of the plan is computed without it; put the data there before training)")
        plan.warn.append(f"dataset not found here: {missing}")
        from dphrl.tasks import find_task

        spec_task = find_task(cfg.dataset.get("type"))
        task = cfg.dataset.get("task") or (spec_task.default_reward if spec_task else None) or "math"
    elif not examples:
        raise ConfigError(f"config key 'dataset': {spec_s} gave no examples")
    else:
        task = examples[0].task
        skipped = getattr(examples, "skipped", 0)
        plan.out.append(
            f"dataset {spec_s}: built {len(examples)} example(s) (first {examples_limit} only)"
            + (f"; {skipped} skipped: {getattr(examples, 'skip_reasons', {})}" if skipped else "")
        )
        ex = examples[0]
        plan.out.append(f"  first: id {ex.id!r}, task {ex.task!r}, answer {ex.answer!r}"
                        + (f", db {ex.db_path}" if ex.db_path else ""))
        content = ex.prompt[-1]["content"] if ex.prompt else ""
        plan.out.append(
            "  prompt: " + (content[:200].replace("\n", " ") + ("..." if len(content) > 200 else ""))
        )
        lens, how = _prompt_lengths(cfg, examples, load_tokenizer)
        if lens:
            too_long = sum(n > cfg.max_prompt_tokens for n in lens)
            plan.out.append(
                f"  prompt tokens ({how}): min {min(lens)}, mean {sum(lens) / len(lens):.0f}, max "
                f"{max(lens)}; {too_long} of {len(lens)} exceed max_prompt_tokens={cfg.max_prompt_tokens}"
            )
            if too_long:
                plan.warn.append(
                    f"{too_long} of {len(lens)} sampled prompts are longer than max_prompt_tokens"
                )
    from dphrl.rewards import get_reward

    reward_name = cfg.reward or task
    try:
        fn = get_reward(reward_name)
    except ValueError as e:
        raise ConfigError(f"config key 'reward': {e}") from e
    plan.out.append(
        f"reward: {reward_name!r} -> {getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', fn)}"
    )


def _reference_section(plan: _Plan, cfg: TrainConfig) -> dict | None:
    """The reference the algorithm needs: a store (rehearsal) or a live frozen model (KL);
    the store's manifest."""
    spec = cfg.spec()
    if spec.rehearsal:
        plan.section(f"{cfg.algorithm} reference store")
        lines, store = _store_report(cfg)
        plan.out.extend(lines)
        if store is None:
            plan.warn.append(
                f"reference store {cfg.reference_store} does not exist yet: run `dphrl presample` first"
            )
        params = f", params {json.dumps(cfg.divergence_params)}" if cfg.divergence_params else ""
        plan.out.append(
            f"  divergence {cfg.divergence} (eta {cfg.eta}{params}), presample: {cfg.presample_n} "
            f"samples/prompt at temperature {cfg.temperature}, D_pef = pass rate >= {cfg.split_threshold}"
        )
        return store
    if spec.uses_live_reference(cfg.kl_coef):
        plan.section(f"{cfg.algorithm} reference")
        where = ("the base model with the LoRA adapter switched off: no copy" if cfg.lora
                 else "a frozen fp32 copy of the model on every device (not sharded)")
        plan.out.append(f"KL term ({cfg.kl_estimator}, kl_coef {cfg.kl_coef}) on rollout tokens to {where}")
    return None


def _batch_plan_section(plan: _Plan, cfg: TrainConfig, launch: Launch, store: dict | None) -> None:
    plan.section(
        f"batch plan ({launch.world_size} process{'es' if launch.world_size > 1 else ''}, {launch.sharding})"
    )
    plan.out.extend(_batch_plan(cfg, launch.world_size, store, plan.warn))


def _memory_section(plan: _Plan, cfg: TrainConfig, info: ModelInfo | None, launch: Launch) -> None:
    plan.section("memory per device (ESTIMATE)")
    if info is None:
        plan.out.append("skipped: model size unknown")
        return
    plan.out.extend(_memory_table(info, cfg, launch.world_size, launch.sharding))
    unsharded = memory_for(info, cfg, world_size=launch.world_size, sharding="ddp").total
    if unsharded + 3 * GiB > 80 * GiB:
        plan.warn.append(
            f"one process holds ~{unsharded / GiB:.0f} GiB unsharded (> an 80 GiB GPU): use FSDP over "
            "several GPUs, or lora=true (see docs/recipes.md)"
        )


def _prompt_lengths(cfg: TrainConfig, examples: list[Example], load_tokenizer: bool) -> tuple[list[int], str]:
    """Prompt lengths with the model's tokenizer when it is available locally, else chars / 4."""
    tok = _local_tokenizer(cfg.model) if load_tokenizer else None
    if tok is not None:
        from dphrl.data.chat import encode_prompt

        try:
            return [len(encode_prompt(tok, ex.prompt)) for ex in examples], "model tokenizer, chat template"
        except Exception:  # noqa: BLE001 - fall back to the rough count
            pass
    return [max(1, sum(len(m["content"]) for m in ex.prompt) // 4) for ex in examples], "estimated as chars/4"


def _local_tokenizer(name: str) -> Any:
    """The model's tokenizer if it can be loaded from local files quickly, else None (never downloads)."""
    from transformers import AutoTokenizer

    from dphrl.models import _prepare_tokenizer, gguf_cache_dir, resolve_model

    try:
        r = resolve_model(name)
        if r.is_gguf:
            d = gguf_cache_dir(r.gguf_file) / "tokenizer"
            return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(d))) if d.is_dir() else None
        if r.source == "local":
            return _prepare_tokenizer(AutoTokenizer.from_pretrained(r.path))
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(r.path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not available offline
        return None


def _batch_plan(cfg: TrainConfig, world: int, store: dict | None, warn: list[str]) -> list[str]:
    from dphrl.rehearsal import rehearsed_prompts_per_step

    P, n, M, mb = cfg.prompts_per_step, cfg.rollout_n, cfg.mini_batches, cfg.micro_batch_size
    lines = []
    rollouts = P * n
    per_proc = rollouts / world
    seq_mb = per_proc / M
    spec = cfg.spec()
    rolled_on = "D_exp prompts only" if spec.rollout_prompts == "d_exp" else "all prompts"
    lines.append(f"prompts/step: {P} ({rolled_on}; {P / world:g} per process)")
    lines.append(f"rollouts/step: {P} x {n} = {rollouts} sequences ({per_proc:g} per process)")
    if cfg.dynamic_sampling:
        lines.append(
            f"  dynamic sampling: up to {1 + cfg.max_refill_rounds} generation rounds per step to refill "
            f"{P} informative groups"
        )
    lines.append(f"updates/step: {cfg.ppo_epochs} epoch(s) x {M} mini-batch(es) = {cfg.ppo_epochs * M}")
    lines.append(f"rollout sequences per mini-batch: {rollouts / M:g} ({seq_mb:g} per process) -> "
                 f"{math.ceil(seq_mb / mb)} micro-batch(es) of <= {mb} per process")
    if spec.rehearsal:
        if store is not None:
            c = store.get("counts", {})
            pef, exp = int(c.get("d_pef") or 0), int(c.get("d_exp") or 0)
            stored = int(c.get("stored_samples") or 0)
            k = rehearsed_prompts_per_step(cfg.ref_prompts_per_step, P, pef, exp)  # the trainer's rule
            per_prompt = stored / max(1, pef)
            ref_seqs = k * per_prompt
            lines.append(
                f"reference prompts/step: {k} D_pef prompt(s) x ~{per_prompt:.1f} stored samples "
                f"= ~{ref_seqs:.0f} reference sequences (~{ref_seqs / world / M:.1f} per process and "
                f"mini-batch -> {math.ceil(ref_seqs / world / M / mb) if ref_seqs else 0} extra "
                "micro-batch(es))"
            )
            if not pef:
                warn.append(
                    "D_pef is empty: dph trains without rehearsal (lower split_threshold or use more data)"
                )
        else:
            k = cfg.ref_prompts_per_step
            lines.append(
                "reference prompts/step: "
                + (f"{k}" if k else "round(prompts_per_step x |D_pef| / |D_exp|)")
                + " D_pef prompt(s), each with all its stored samples (sizes known after presample)"
            )
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    lines.append(
        f"max sequence length: {cfg.max_prompt_tokens} prompt + {cfg.max_new_tokens} response = {seq} tokens"
    )
    updates = cfg.max_steps * cfg.ppo_epochs * M
    lines.append(f"optimizer updates: {cfg.max_steps} steps x {cfg.ppo_epochs * M} = {updates} "
                 f"(lr {cfg.lr:g}, {cfg.lr_schedule}, warmup {cfg.warmup_steps})")
    lines.append(f"rollouts generated over the run: {cfg.max_steps * rollouts:,} sequences "
                 f"(<= {cfg.max_steps * rollouts * cfg.max_new_tokens:,} response tokens)")
    if spec.rehearsal and cfg.dataset.get("limit"):
        lines.append(f"presample: {cfg.dataset['limit']} prompts x {cfg.presample_n} = "
                     f"{int(cfg.dataset['limit']) * cfg.presample_n:,} sequences")
    return lines


def _memory_table(info: ModelInfo, cfg: TrainConfig, world: int, shard: str) -> list[str]:
    n = max(world, 8)
    layouts: list[tuple[str, int, str]] = [("1 device", 1, "none")]
    if world > 1:
        layouts.append((f"this launch: {shard} x {world}", world, shard))
    for label, w, s in ((f"DDP x {n}", n, "ddp"), (f"FSDP/ZeRO-3 x {n}", n, "fsdp")):
        if (w, s) != (world, shard) and not (s == "fsdp" and shard == "zero3" and w == world):
            layouts.append((label, w, s))
    ests = [(label, memory_for(info, cfg, world_size=w, sharding=s)) for label, w, s in layouts]
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    a = "bf16" if cfg.dtype == "bfloat16" else "fp32"
    lines = [
        f"inputs: micro_batch {cfg.micro_batch_size}, seq_len {seq}, response_len {cfg.max_new_tokens}, "
        f"generation batch {cfg.generation_batch_size}, activations in {a}, activation factor "
        f"{activation_factor(info.hidden, info.intermediate, info.kv_dim):.2f} x hidden per token and layer",
    ]
    header = f"{'component':<17}" + "".join(f"{label:>26}" for label, _ in ests)
    lines.append(header)
    for i, (name, _) in enumerate(ests[0][1].rows()):
        lines.append(f"{name:<17}" + "".join(f"{_gib(e.rows()[i][1]):>26}" for _, e in ests))
    lines.append(f"{'fits 80/141 GiB':<17}" + "".join(f"{_fits(e.total):>26}" for _, e in ests))
    lines.append(
        "(estimate: weights fp32 + grads + AdamW states of the trained params, sharded under FSDP/ZeRO-3; "
        "activations without gradient checkpointing; + ~1-3 GiB CUDA context/allocator slack. "
        "Formula: dphrl.memory.estimate_memory, docs/recipes.md.)"
    )
    if cfg.spec().uses_live_reference(cfg.kl_coef) and not cfg.lora:
        lines.append(f"{cfg.algorithm} full fine-tuning: the frozen reference copy is not sharded")
    return lines


# --------------------------------------------------------------------------------------------------
# python -m dphrl.dryrun


def main(argv: list[str] | None = None) -> int:
    from dphrl.config import load_config

    p = argparse.ArgumentParser(prog="python -m dphrl.dryrun", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--num-processes", "--world-size", dest="world_size", type=int, default=None)
    p.add_argument("--sharding", choices=SHARDINGS, default=None)
    p.add_argument("--examples", type=int, default=8, help="examples to build (default 8)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        print(dry_run(cfg, examples_limit=args.examples, world_size=args.world_size, sharding=args.sharding))
    except ConfigError as e:
        print(f"dphrl: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
