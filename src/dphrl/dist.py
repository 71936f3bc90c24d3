"""Collectives the RL loop needs, as no-ops on one process.

Every rank calls each of them at the same point of the loop (under FSDP a forward is a collective
too), so the global normalizers, dynamic-sampling quotas, stop signals and step metrics are the same
on every rank and do not depend on the number of processes.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

__all__ = ["SUMMED_METRICS", "Collectives"]

#: Step metrics that are totals over ranks (every other metric is a mean over the ranks that report it).
SUMMED_METRICS = frozenset({"reward/failures", "rollout/sequences", "rollout/groups_kept", "ref/sequences",
                            "ref/tokens"})


class Collectives:
    """All-reduce, all-gather and metric reduction over the processes of ``acc``."""

    def __init__(self, acc: Accelerator):
        self.acc = acc
        self.world, self.rank = acc.num_processes, acc.process_index

    def allreduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum (or max) of ``values`` over ranks, in one collective."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], device=self.acc.device)
        if op == "max":
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return t.tolist()
        return self.acc.reduce(t, reduction="sum").tolist()

    def allgather_int(self, x: int) -> list[int]:
        """``x`` of every rank, in rank order."""
        if self.world == 1:
            return [int(x)]
        t = torch.tensor([int(x)], device=self.acc.device)
        return [int(v) for v in self.acc.gather(t).tolist()]

    def gather_objects(self, items: list) -> list:
        """Every rank's ``items`` concatenated in rank order (picklable objects)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Step metrics over ranks: :data:`SUMMED_METRICS` summed, the others averaged over the ranks that
        report them (ranks may hold different keys, e.g. no reference samples: no div/* metrics)."""
        if self.world == 1:
            return metrics
        keys = sorted(set(self.gather_objects(sorted(metrics))))
        t = torch.tensor(
            [[float(metrics.get(k, 0.0)), float(k in metrics)] for k in keys], device=self.acc.device
        )
        t = self.acc.reduce(t, reduction="sum")  # (K, 2): sum of values, number of ranks with the key
        return {k: s if k in SUMMED_METRICS else s / max(n, 1.0) for k, (s, n) in zip(keys, t.tolist())}

    def agreed_signal(self, requested: str | None) -> str | None:
        """The stop signal any rank received (``SIGINT`` / ``SIGTERM``), the same on every rank, or None."""
        code = {None: 0.0, "SIGINT": 1.0, "SIGTERM": 2.0}.get(requested, 2.0)
        (agreed,) = self.allreduce([code], op="max")
        return {0.0: None, 1.0: "SIGINT", 2.0: "SIGTERM"}[agreed]
