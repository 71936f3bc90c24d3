"""2 CPU processes (torchrun, gloo) give the same update of a global batch as 1 process.

The worker (``tests/_ddp_worker.py``) shards a fixed batch of rollout and reference sequences the
way the Trainer does and calls ``Trainer.optimizer_step``. Gradients are compared before Adam
normalizes them away (Adam's first step is ~lr * sign(g), blind to a wrong gradient scale), then the
global grad norm and the updated weights.
"""

from __future__ import annotations

from pathlib import Path

import _ddp_worker as worker
import pytest
import torch
from _shared import run_two_processes

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_match_one(tmp_path):
    store = tmp_path / "store"
    worker.make_store(store)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_out.mkdir()
    single_out.mkdir()
    run_two_processes(ROOT / "tests" / "_ddp_worker.py", [str(store), str(ddp_out)], ddp_out, "started_rank*")

    single = worker.run(store, single_out)  # in-process: 1 process, the whole batch
    r0 = torch.load(ddp_out / "rank0.pt", weights_only=False)
    r1 = torch.load(ddp_out / "rank1.pt", weights_only=False)
    assert (single["world"], r0["world"], r1["world"]) == (1, 2, 2)

    # the Trainer's own sharding: every prompt group / stored reference sample on exactly one rank,
    # reference samples spread evenly (never all on one rank)
    assert len(single["local_prompts"]) == worker.GROUPS
    assert sorted(r0["local_prompts"] + r1["local_prompts"]) == sorted(single["local_prompts"])
    assert len(r0["local_prompts"]) == len(r1["local_prompts"]) == worker.GROUPS // 2
    assert len(single["ref_batch"]) >= 2, "degenerate store: no reference samples to shard"
    assert sorted(r0["ref_batch"] + r1["ref_batch"]) == sorted(single["ref_batch"])
    assert abs(len(r0["ref_batch"]) - len(r1["ref_batch"])) <= 1

    for agg in worker.AGGS:
        s, a, b = single[agg], r0[agg], r1[agg]
        # the shards really were uneven and split the way the trainer splits them
        assert (a["n_rolls"], b["n_rolls"], s["n_rolls"]) == (6, 6, 12)
        assert (a["n_refs"], b["n_refs"], s["n_refs"]) == (4, 3, 7)
        assert s["skipped"] == a["skipped"] == 0.0
        assert s["grads"].keys() == a["grads"].keys() == s["weights"].keys()
        # gradients (after DDP's all-reduce) equal the single-process gradients of the full batch
        total = torch.sqrt(sum((g.double() ** 2).sum() for g in s["grads"].values())).item()
        assert total > 1e-3, "degenerate test batch: no gradient"
        for n, g in s["grads"].items():
            torch.testing.assert_close(a["grads"][n], g, atol=1e-7, rtol=1e-5, msg=f"{agg}: grad of {n}")
            assert torch.equal(a["grads"][n], b["grads"][n]), f"{agg}: ranks disagree on grad of {n}"
        assert a["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)
        for n, w in s["weights"].items():
            torch.testing.assert_close(a["weights"][n], w, atol=1e-6, rtol=0, msg=f"{agg}: weight {n}")
            assert torch.equal(a["weights"][n], b["weights"][n]), f"{agg}: ranks disagree on weight {n}"
    # metrics are reduced over the union of the ranks' keys
    assert r0["reduced"] == r1["reduced"] == {"a": 0.5, "only_rank0": 5.0}
    assert single["reduced"] == {"a": 0.0, "only_rank0": 5.0}
    # the full loop ran on 2 processes although only one of them had a reference sample per step
    import json

    lines = [json.loads(x) for x in (ddp_out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(x["ref/sequences"] == 1.0 and "div/value" in x for x in lines)
    local = ("memory/",)  # measured per process after the reduction
    same = [k for k in r0["train_last"] if not k.startswith(local)]
    assert {k: r0["train_last"][k] for k in same} == {k: r1["train_last"][k] for k in same}
    ck = ddp_out / "train" / "checkpoints" / "step_000001"
    assert (ck / "rng_0.json").exists() and (ck / "rng_1.json").exists()
    assert (ddp_out / "train" / "final" / "config.json").exists()

    # the two aggregations are different losses: the check above is not trivially satisfied
    g_tok, g_seq = single["token-mean"]["grads"], single["seq-mean-token-mean"]["grads"]
    assert any(not torch.allclose(g_tok[n], g_seq[n], atol=1e-6) for n in g_tok)
