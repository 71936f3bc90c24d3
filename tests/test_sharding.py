"""Sharded models (torch FSDP1 and FSDP2, 2 CPU processes): generation inside
``sharding.generation_context`` gives exactly the unsharded model's tokens and log-probs, and the full
state dict / weights gathered from the shards are the model's own (see ``tests/_fsdp_worker.py``)."""

from __future__ import annotations

from pathlib import Path

import _fsdp_worker as worker
import pytest
import torch
from _shared import run_two_processes

from dphrl import sharding
from dphrl.engines.hf import HFEngine


def test_unsharded_model_is_none():
    tok = worker.tokenizer()
    m = worker.model(tok)
    assert sharding.sharding_kind(m) == "none"
    with sharding.generation_context(m), sharding.full_parameters(m):
        pass
    sd = sharding.full_state_dict(m)
    assert sd.keys() == m.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_sharded_generation_and_state_dict_match_unsharded(tmp_path, kind):
    run_two_processes(Path(worker.__file__), [str(tmp_path), kind], tmp_path, f"started_{kind}_rank*")
    tok = worker.tokenizer()
    ref_model = worker.model(tok)
    ref_engine = HFEngine(ref_model, tok)
    full_numel = sum(p.numel() for p in ref_model.parameters())
    for rank in (0, 1):
        r = torch.load(tmp_path / f"{kind}_rank{rank}.pt", weights_only=False)
        assert r["kind"] == kind and r["world"] == 2
        assert r["local_numel"] < full_numel  # really sharded
        assert r["full_numel"] == full_numel  # full_parameters() gathers everything
        want = worker.generate(ref_engine, worker.prompts_for(rank, tok))
        for mode in ("sampled", "greedy"):
            got_rows, want_rows = r["gen"][mode], want[mode]
            assert len(got_rows) == len(want_rows)
            for (g_ids, g_lp, g_fin), (w_ids, w_lp, w_fin) in zip(got_rows, want_rows):
                assert g_ids == w_ids and g_fin == w_fin
                assert g_lp == pytest.approx(w_lp, abs=1e-5)
    lengths = {len(ids) for rank in (0, 1) for ids, _, _ in torch.load(
        tmp_path / f"{kind}_rank{rank}.pt", weights_only=False)["gen"]["sampled"]}
    assert len(lengths) > 1  # responses of different lengths: synced decoding was exercised
    r0 = torch.load(tmp_path / f"{kind}_rank0.pt", weights_only=False)
    want_sd = ref_model.state_dict()
    for name in ("state_dict", "reloaded"):
        got = r0[name]
        # tied embeddings: the unsharded state dict lists lm_head.weight, the sharded one may not
        assert set(got) <= set(want_sd) and len(got) >= len(want_sd) - 1
        for k, v in got.items():
            torch.testing.assert_close(v, want_sd[k], rtol=0, atol=0, msg=f"{name}: {k}")
