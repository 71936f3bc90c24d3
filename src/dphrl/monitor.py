"""What the loop reports: metrics.jsonl and the trackers, completion logs, evaluation during training."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from dphrl.config import TrainConfig
from dphrl.data.example import Example
from dphrl.dist import Collectives
from dphrl.engines.sync import EngineWeights
from dphrl.rollout import Seq

__all__ = ["Monitor", "peak_memory_mb"]


class Monitor:
    """Logs of one run (rank 0 writes) and its evaluation on ``eval_data`` (every rank samples a share)."""

    def __init__(self, cfg: TrainConfig, acc: Accelerator, coll: Collectives, out: Path, tokenizer: Any,
                 eval_sets: dict[str, list[Example]]):
        self.cfg, self.acc, self.coll, self.out, self.tokenizer = cfg, acc, coll, out, tokenizer
        self.eval_sets = eval_sets
        self.last_eval: dict[str, float] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One line of metrics.jsonl (and the trackers)."""
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:  # one line per write, on disk before the next step
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.cfg.trackers:
            self.acc.log(metrics, step=step)

    def evaluate(self, engine: Any, weights: EngineWeights, step: int) -> dict[str, float]:
        """Pass@k (k = 1, 2, 4, ..., eval_n), greedy accuracy, mean reward and the task's styles of the
        current policy on ``eval_data``: each process samples its share of the problems, the records are
        merged. Returns ``eval/<name>/<metric>`` keys (the report plots them over steps)."""
        from dphrl.evaluation.runner import dataset_metrics, evaluate
        from dphrl.rewards.registry import get_reward
        from dphrl.tasks import eval_hooks

        cfg, rank, world = self.cfg, self.coll.rank, self.coll.world
        out: dict[str, float] = {}
        for name, exs in self.eval_sets.items():
            mine = exs[rank::world]
            style_fn, answer_fn = eval_hooks(exs)
            records: list[dict[str, Any]] = []
            with weights.generating():
                evaluate(
                    engine,
                    self.tokenizer,
                    {name: mine},
                    get_reward(cfg.eval_reward or exs[0].task),
                    n=cfg.eval_n,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens,
                    seed=cfg.seed * 7_919 + step * 104_729 + 17 + rank,
                    style_fn=style_fn,
                    answer_fn=answer_fn,
                    num_workers=cfg.reward_workers,
                    timeout_s=cfg.reward_timeout_s,
                    progress=False,
                    show_table=False,
                    prompts_per_call=max(1, cfg.generation_batch_size // cfg.eval_n),
                    records_out=records,
                )
            for r in records:  # problem index within this rank's share -> within the whole set
                r["problem"] = int(r["problem"]) * world + rank
            m = dataset_metrics(self.coll.gather_objects(records))
            out.update({f"eval/{name}/pass@{k}": float(v) for k, v in m["pass@k"].items()})
            out[f"eval/{name}/greedy_acc"] = float(m["greedy"] or 0.0)
            out[f"eval/{name}/mean_reward"] = float(m["mean_reward"] or 0.0)
            if "styles" in m:
                out[f"eval/{name}/effective_styles"] = float(m["styles"]["effective_styles"])
            if m["diversity"].get("distinct_correct_answers") is not None:
                out[f"eval/{name}/distinct_correct"] = float(m["diversity"]["distinct_correct_answers"])
        self.last_eval = out
        return out

    def log_completions(self, rollouts: list[Seq], step: int) -> None:
        """A few of this step's rollouts (prompt, response, reward, advantage) to completions.jsonl and
        to the trackers that have tables (wandb) or text (tensorboard)."""
        if not self.acc.is_main_process:
            return
        rows = [{"step": step, "prompt": self.tokenizer.decode(s.prompt_ids, skip_special_tokens=False),
                 "response": s.text, "reward": s.reward, "advantage": s.advantage}
                for s in rollouts[: self.cfg.completions_per_log]]
        with open(self.out / "completions.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for tracker in self.acc.trackers:
            try:
                if tracker.name == "wandb":
                    import wandb  # type: ignore[import-not-found]

                    cols = list(rows[0]) if rows else []
                    tracker.log(
                        {"completions": wandb.Table(columns=cols, data=[list(r.values()) for r in rows])},
                        step=step,
                    )
                elif tracker.name == "tensorboard":
                    tracker.writer.add_text("completions", "\n\n".join(json.dumps(r) for r in rows), step)
            except Exception as e:  # noqa: BLE001 - a tracker's table must never stop training
                tqdm.write(f"completions: tracker {tracker.name} failed: {e}")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
