"""Checkpoints (save, resume), the final model, its model card and the optional Hub push.

A checkpoint is written into a temporary directory, marked complete last, then renamed into place:
only marked checkpoints are resumable and a kill at any moment leaves the previous one intact. It
holds the weights, the optimizer and scheduler, the data position, every rank's RNG and the resolved
config, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from dphrl import sharding
from dphrl.config import ConfigError, TrainConfig
from dphrl.dist import Collectives
from dphrl.errors import UserError
from dphrl.fsutil import atomic_write_text, remove_dir, replace_dir, sha256_file

__all__ = [
    "CHECKPOINT_MARKER",
    "RESUME_MUST_MATCH",
    "CheckpointError",
    "TrainingStopped",
    "complete_checkpoints",
    "load_checkpoint",
    "verify_checkpoint",
    "model_card",
    "push_folder",
    "record_resume",
    "resume_config_changes",
    "save_checkpoint",
    "save_final",
]

#: Written last into a checkpoint dir (before its rename): only marked checkpoints are resumable.
CHECKPOINT_MARKER = "COMPLETE"

#: Config keys a resumed run must share with its checkpoint (they define what was trained so far).
RESUME_MUST_MATCH = frozenset({
    "model", "algorithm", "dataset", "reward", "seed", "reference_store", "lora", "lora_r", "lora_alpha",
    "lora_target_modules", "dtype", "rollout_n", "prompts_per_step", "presample_n", "split_threshold",
    "keep_per_prompt", "max_prompt_tokens", "temperature", "top_p",
})


class TrainingStopped(RuntimeError):
    """SIGTERM / SIGINT stopped training at a step boundary after writing a checkpoint."""

    def __init__(self, signal_name: str, checkpoint: Path):
        self.signal_name, self.checkpoint = signal_name, checkpoint
        super().__init__(
            f"{signal_name}: stopped after step {checkpoint.name.removeprefix('step_').lstrip('0') or 0}; "
            f"checkpoint {checkpoint}. Resume with `dphrl train --config ... --resume latest`."
        )


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be resumed (missing, damaged, from another base model or dphrl version);
    the message names the file and says what to do."""


#: Checkpoint file names: weights (safetensors), optimizer tensors, JSON state; the marker lists them all.
WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "optimizer.pt", "trainer_state.json"


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoint dirs that were fully written (their marker is written last, before the rename)."""
    return sorted(
        p for p in (out / "checkpoints").glob("step_*") if p.is_dir() and (p / CHECKPOINT_MARKER).is_file()
    )


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: every tensor for full fine-tuning; under LoRA (frozen
    parameters present) only the trainable ones (the adapter), the frozen base named by fingerprint."""
    sd = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keep = [k for k in sd if k in trainable] if frozen else list(sd)
    # contiguous copies: safetensors refuses shared storage (tied embeddings) and views
    return {k: sd[k].detach().cpu().contiguous().clone() for k in keep}


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON (python, numpy, torch as base64 bytes)."""
    import base64

    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def _set_rng_state(st: dict[str, Any]) -> None:
    import base64

    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    nps = st["numpy"]
    np.random.set_state((nps[0], np.array(nps[1], dtype=np.uint32), nps[2], nps[3], nps[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8))


def save_checkpoint(out: Path, step: int, *, acc: Accelerator, coll: Collectives, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any], cfg: TrainConfig,
                    base_fingerprint: str = "") -> Path:
    """Atomic checkpoint (temp dir then rename) of everything needed to resume exactly; ``state`` is the
    trainer's own (data position, totals: JSON). Tensors only, never pickled code: weights in
    safetensors (under LoRA the adapter only, with the base model's ``base_fingerprint``), optimizer
    state loadable with ``weights_only=True``, the rest JSON; the completion marker, written last,
    holds every file's sha256. Keeps the last ``cfg.keep_last`` complete checkpoints."""
    from safetensors.torch import save_file

    ckdir = out / "checkpoints"
    final = ckdir / f"step_{step:06d}"
    tmp = ckdir / f".step_{step:06d}.tmp"
    sharded = sharding.is_sharded(model)
    full = sharding.full_state_dict(model) if sharded else None  # a collective: every rank
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if full is not None:
            weights = {k: v.detach().cpu().contiguous().clone() for k, v in full.items()}
        else:
            weights = _trainable_state(acc.unwrap_model(model))
        save_file(weights, str(tmp / WEIGHTS))
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        meta = {"step": step, "scheduler": scheduler.state_dict(), "base_fingerprint": base_fingerprint,
                "weights": "adapter" if len(weights) < len(acc.unwrap_model(model).state_dict()) else "full",
                **state}
        atomic_write_text(tmp / STATE, json.dumps(meta))
        cfg.save(tmp / "config.yaml")
    acc.wait_for_everyone()
    atomic_write_text(tmp / f"rng_{coll.rank}.json", json.dumps(_rng_state()))
    if sharded:  # each rank's optimizer state holds its own shards
        torch.save(optimizer.state_dict(), tmp / f"optimizer_{coll.rank}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        atomic_write_text(tmp / CHECKPOINT_MARKER, json.dumps({"step": step, "world_size": coll.world,
                                                                "files": files}))
        replace_dir(tmp, final)
        done = complete_checkpoints(out)
        for old in done[: max(0, len(done) - cfg.keep_last)]:
            remove_dir(old)  # renamed away first: never a half-deleted step_N
    acc.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's marker, after checking that every file it lists is there with its sha256
    (CheckpointError naming the first missing or altered file)."""
    try:
        marker = json.loads((path / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {CHECKPOINT_MARKER} ({e})") from e
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise CheckpointError(
            f"checkpoint {path}: written by an older dphrl (pickled model.pt, no checksums); "
            "it is not loaded, since a pickle can run code. Start a new run (--overwrite)."
        )
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        if sha256_file(f) != want:
            raise CheckpointError(
                f"checkpoint {path}: file {name} is damaged (its sha256 differs from the one "
                f"recorded when it was written)"
            )
    return marker


def checkpoint_path(out: Path, path: str | Path) -> Path:
    """``latest`` -> the newest complete checkpoint under ``out``; any other path must be complete. Either
    is verified (:func:`verify_checkpoint`); a damaged one is refused by name, the previous one offered."""
    if str(path) == "latest":
        done = complete_checkpoints(out)
        if not done:
            raise CheckpointError(
                f"--resume latest: no complete checkpoint under {out / 'checkpoints'} (the run "
                "stopped before its first save_every). Start it again with --overwrite."
            )
        path = done[-1]
    else:
        done = (
            complete_checkpoints(Path(path).parent.parent) if Path(path).parent.name == "checkpoints" else []
        )
    path = Path(path)
    if not (path / CHECKPOINT_MARKER).is_file():
        raise CheckpointError(f"--resume {path}: not a complete checkpoint (no {CHECKPOINT_MARKER})")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        older = [p for p in done if p.name < path.name]
        hint = (f" The previous complete checkpoint is {older[-1]}: resume from it with --resume {older[-1]}."
                if older else " No earlier checkpoint is kept: start again with --overwrite.")
        raise CheckpointError(f"{e}.{hint}") from e
    return path


def load_checkpoint(path: Path, *, acc: Accelerator, coll: Collectives, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig,
                    base_fingerprint: str = "") -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG from a verified checkpoint; return the
    trainer state. Nothing is unpickled beyond tensors (``weights_only=True``).

    The current config's optimizer hyper-parameters (lr, betas, weight_decay) are applied to the
    restored optimizer, and the LR schedule is re-evaluated at the restored step for the new base LR.
    """
    from safetensors.torch import load_file

    st = json.loads((path / STATE).read_text())
    if st.get("weights") == "adapter" and st.get("base_fingerprint") != base_fingerprint:
        raise CheckpointError(
            f"checkpoint {path}: its adapter was trained on other base weights (fingerprint "
            f"{st.get('base_fingerprint')}, the loaded model's is {base_fingerprint}); load the "
            "run's base model (config key 'model')."
        )
    weights = load_file(str(path / WEIGHTS))
    if sharding.is_sharded(model):
        sharding.load_full_state_dict(model, weights if acc.is_main_process else {})
        opt = _load_tensors(path / f"optimizer_{coll.rank}.pt")
    else:
        plain = acc.unwrap_model(model)
        missing, unexpected = plain.load_state_dict(weights, strict=st.get("weights") != "adapter")
        trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
        if unexpected or trainable - set(weights):
            raise CheckpointError(
                f"checkpoint {path}: its weights do not fit this model (unexpected "
                f"{sorted(unexpected)[:3]}, missing {sorted(trainable - set(weights))[:3]})"
            )
        opt = _load_tensors(path / OPTIMIZER)
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(st["scheduler"])
    _set_rng_state(json.loads((path / f"rng_{coll.rank}.json").read_text()))
    for group in optimizer.param_groups:  # the current config's optimizer hyper-parameters
        group["lr"] = cfg.lr
        group["betas"] = tuple(cfg.betas)
        group["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, _scheduled_lrs(scheduler)):
        group["lr"] = lr
    return st


def _load_tensors(f: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    import pickle

    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint file {f} holds not only tensors (refused unread: a pickle can run code): "
            f"{str(e).splitlines()[0][:200]}"
        ) from None


def _scheduled_lrs(sched: Any) -> list[float]:
    """The LR schedule's value at the restored step for the (possibly changed) base LR."""
    if hasattr(sched, "lr_lambdas"):
        return [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    return sched.get_last_lr()


def resume_config_changes(path: Path, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs from the checkpoint's config; refuse those that define the run."""
    import yaml

    saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    now = cfg.to_dict()
    changes = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved[k] != v}
    fixed = sorted(k for k in changes if k in RESUME_MUST_MATCH)
    if fixed:
        raise ConfigError(
            f"--resume {path}: the config differs from the checkpoint's in keys that define the run: "
            + ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in fixed)
            + ". Resume with the checkpoint's values, or start a new run (--overwrite, or another "
              "output_dir)."
        )
    return changes


def record_resume(out: Path, path: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Drop log lines past the checkpoint (atomic rewrite); print and log the changed config keys."""
    if (out / "metrics.jsonl").exists():
        keep, torn = [], 0
        for ln in (out / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                row = json.loads(ln) if ln.strip() else None
            except ValueError:  # a line torn by a kill mid-write: repaired (dropped), and said
                torn += 1
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(ln)
        atomic_write_text(out / "metrics.jsonl", "".join(ln + "\n" for ln in keep))
        if torn:
            print(f"dphrl: metrics.jsonl: dropped {torn} torn line(s) left by an interrupted write")
    if changes:
        print(f"dphrl: resuming {path.name} with changed config: "
              + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        with open(out / "resume_log.jsonl", "a") as f:
            f.write(json.dumps({"checkpoint": path.name, "step": step,
                                "changed": {k: [a, b] for k, (a, b) in changes.items()}}) + "\n")


def save_final(out: Path, *, acc: Accelerator, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig,
               run_info: dict, totals: dict, last_eval: dict[str, float], step: int) -> Path:
    """save_pretrained (+ tokenizer + resolved config + model card) into ``out/final``: loadable by plain
    transformers (LoRA merged). Pushed to the Hub when ``push_to_hub`` is set."""
    final = out / "final"
    acc.wait_for_everyone()
    full = sharding.full_state_dict(model) if sharding.is_sharded(model) else None  # a collective: every rank
    if acc.is_main_process:
        plain = acc.unwrap_model(model)
        if cfg.lora:
            plain = copy.deepcopy(plain).merge_and_unload()
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp, **({"state_dict": full} if full is not None else {}))
        tokenizer.save_pretrained(tmp)
        cfg.save(tmp / "dphrl_config.yaml")
        (tmp / "dphrl_run_info.json").write_text(json.dumps(run_info, indent=1))
        (tmp / "dphrl_totals.json").write_text(json.dumps({"step": step, **totals}))
        (tmp / "README.md").write_text(model_card(cfg, run_info, last_eval, step))
        replace_dir(tmp, final)  # never a moment without a final/ once one existed
        if cfg.push_to_hub:
            push_folder(final, cfg.push_to_hub)
    acc.wait_for_everyone()
    return final


def model_card(cfg: TrainConfig, run_info: dict, last_eval: dict[str, float], step: int) -> str:
    """``final/README.md`` in the Hugging Face model-card format (YAML metadata + a description): the base
    model, algorithm, divergence, key config, data and the latest evaluation numbers."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = cfg.spec()
    base = cfg.model if "/" in cfg.model and not cfg.model.startswith((".", "/", "~")) else None
    tags = ["dphrl", "rlvr", "reinforcement-learning", cfg.algorithm]
    if spec.rehearsal:
        tags.append(f"divergence-{cfg.divergence}")
    data = ModelCardData(
        library_name="transformers", base_model=base, tags=tags, pipeline_tag="text-generation"
    )
    key = {
        k: getattr(cfg, k)
        for k in (
            "algorithm",
            "lr",
            "max_steps",
            "prompts_per_step",
            "rollout_n",
            "temperature",
            "clip_low",
            "clip_high",
            "dual_clip",
            "loss_agg",
            "advantage",
            "seed",
            "lora",
        )
    }
    if spec.rehearsal:
        key.update(divergence=cfg.divergence, eta=cfg.eta, rehearsal_form=cfg.rehearsal_form,
                   reference_store=cfg.reference_store)
    if spec.uses_live_reference(cfg.kl_coef):
        key.update(kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    lines = [
        f"# {Path(cfg.output_dir).name}",
        "",
        f"Fine-tuned from `{cfg.model}` with [dphrl](https://github.com/) (`{cfg.algorithm}`: "
        f"{spec.summary}), {step} RL steps on `{json.dumps(cfg.dataset)}` with reward "
        f"`{cfg.reward or 'the task default'}`.",
        "",
        "## Training configuration (key values; the full resolved config is `dphrl_config.yaml`)",
        "",
        "| key | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in key.items()]
    lines += ["", f"Engine {run_info.get('engine')}, {run_info.get('world_size')} process(es), "
              f"versions {json.dumps(run_info.get('versions', {}))}.", ""]
    if last_eval:
        lines += ["## Latest evaluation (during training)", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4f} |" for k, v in sorted(last_eval.items())]
        lines.append("")
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))
    return str(card)


def push_folder(folder: Path, repo_id: str) -> None:
    """Upload ``folder`` (the final model, exactly as written) to the Hub repo ``repo_id``."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="dphrl: final model")
