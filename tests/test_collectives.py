"""Every rank runs the same number of collectives: uneven shards finish under DDP, FSDP1 and FSDP2 on
2 CPU processes and give the same update as 1 process on the same global batch; DAPO's quota is global."""

from __future__ import annotations

from pathlib import Path

import _collectives_worker as worker
import _ddp_worker as base
import torch
from _shared import run_two_processes

ROOT = Path(__file__).resolve().parents[1]


def test_uneven_shards_match_one_process(tmp_path):
    store = tmp_path / "store"
    base.make_store(store)
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    run_two_processes(ROOT / "tests" / "_collectives_worker.py", [str(store), str(two)], two, "started_rank*",
                      timeout=300)
    single = worker.run(str(store), str(one), modes=("ddp",))  # 1 process: no sharding, the whole batch
    r0 = torch.load(two / "rank0.pt", weights_only=False)
    r1 = torch.load(two / "rank1.pt", weights_only=False)
    assert (single["world"], r0["world"], r1["world"]) == (1, 2, 2)
    for mode in worker.MODES:
        for agg in worker.AGGS:
            for s in worker.SPLITS:
                ref = single[("ddp", agg, s)]
                a = r0[(mode, agg, s)]
                assert a["kind"] == {"ddp": "none", "fsdp1": "fsdp1", "fsdp2": "fsdp2"}[mode]
                n0, n1 = a["n"], r1[(mode, agg, s)]["n"]
                # really uneven, same global batch
                assert n0 != n1 and (n0[0] + n1[0], n0[1] + n1[1]) == ref["n"]
                assert a["metrics"]["update/empty_skipped"] == 0.0
                moved = max(
                    (ref["weights"][k] - base.model(base.tokenizer()).state_dict()[k]).abs().max().item()
                    for k in ref["weights"]
                )
                assert moved > 1e-4, "degenerate batch: the update did not move the weights"
                for k, w in ref["weights"].items():
                    torch.testing.assert_close(a["weights"][k], w, atol=2e-6, rtol=1e-5,
                                               msg=f"{mode} {agg} {s}: weight {k}")
    # DAPO's informative-group quota is global: the groups kept over both ranks are the single process's
    for step, kept in enumerate(single["dapo"]["kept"]):
        both = sorted(r0["dapo"]["kept"][step] + r1["dapo"]["kept"][step])
        assert both == kept and len(kept) == 4, (step, both, kept)
