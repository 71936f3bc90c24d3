"""Test helpers: locate the shared benchmark data (never copied into the repo) and reward functions
for the worker-pool tests (module-level, so worker processes can import them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dphrl.data.example import Example


def shared_data_dir() -> Path | None:
    """``<repo>/../shared/data`` resolved from this file, else ``$DPHRL_SHARED_DATA``, else None."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data"]
    if os.environ.get("DPHRL_SHARED_DATA"):
        candidates.append(Path(os.environ["DPHRL_SHARED_DATA"]))
    for c in candidates:
        if c.is_dir():
            return c
    return None


def require_shared(*parts: str) -> Path:
    """Path to a shared data file/folder; skip the test with a clear message if it is absent."""
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared benchmark data not found at ../shared/data (set DPHRL_SHARED_DATA to its location)")
    p = root.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared benchmark data {p} is absent")
    return p


def behaving_reward(response: str, example: Example) -> float:
    """``ok`` -> 1.0, ``hang`` -> sleeps, ``busy`` -> stuck in one C call, ``raise`` -> error, ``crash`` -> exits."""
    if response == "hang":
        time.sleep(3600)
    if response == "busy":
        return float(sum(range(10**13)) > 0)  # a single C loop: signals cannot interrupt it
    if response == "raise":
        raise RuntimeError("reward blew up")
    if response == "crash":
        os._exit(3)
    if response == "nan":
        return float("nan")
    return 1.0 if response == "ok" else 0.0
