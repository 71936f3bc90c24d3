"""Reward registry and batched scoring: names, time-outs, failures, the worker pool."""

from __future__ import annotations

import threading
import time

import pytest

from dphrl.data.example import Example
from dphrl.rewards import BatchScores, get_reward, register_reward, score_batch
from dphrl.rewards.registry import list_rewards
from dphrl.rewards.sandbox import WorkerPool, can_interrupt, time_limit

try:
    from _shared import behaving_reward
except ImportError:  # tests collected as a package
    from tests._shared import behaving_reward


def _ex(i: int) -> Example:
    return Example(id=str(i), prompt=[{"role": "user", "content": "q"}], answer="1")


def test_builtin_names_and_module_spec():
    names = list_rewards()
    for n in ("math", "gsm8k", "sql", "spider", "bird"):
        assert n in names
    assert get_reward("gsm8k") is get_reward("math")
    assert get_reward("spider") is get_reward("sql")
    assert get_reward("dphrl.rewards.math:math_reward") is get_reward("math")
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("dphrl.rewards.math:nope")


def test_register_decorator():
    @register_reward("_test_const")
    def const(response: str, example: Example) -> float:
        return 0.5

    assert get_reward("_test_const") is const
    assert score_batch(const, ["a"], [_ex(0)]).scores == [0.5]


def test_sequential_counts_failures_and_timeouts():
    assert can_interrupt()
    items = ["ok", "raise", "hang", "nan", "ok"]
    t0 = time.monotonic()
    res = score_batch(
        behaving_reward, items, [_ex(i) for i in range(len(items))], timeout_s=0.5, num_workers=0
    )
    assert time.monotonic() - t0 < 3.0
    assert isinstance(res, BatchScores)
    assert res.scores == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert (res.failures, res.timeouts) == (2, 1)  # raise + nan, hang
    assert set(res.errors) == {1, 2, 3}
    assert all("behaving_reward" in m for m in res.errors.values())  # messages name the reward


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        score_batch(behaving_reward, ["ok"], [])


def test_pool_hang_raise_crash():
    items = ["hang", "busy", "ok", "raise", "crash", "ok", "nan"]
    timeout = 1.5
    t0 = time.monotonic()
    res = score_batch(
        behaving_reward, items, [_ex(i) for i in range(len(items))], timeout_s=timeout, num_workers=2
    )
    elapsed = time.monotonic() - t0
    assert res.scores == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert res.timeouts == 2, res.errors
    assert res.failures == 3, res.errors  # raise, crash, nan
    assert "RuntimeError" in res.errors[3]
    # bounded (the hang is 1 h); includes (re)starting workers on a loaded machine
    assert elapsed < timeout + 20.0, elapsed
    # the pool is persistent and healthy afterwards (killed workers were replaced)
    t0 = time.monotonic()
    res2 = score_batch(
        behaving_reward, ["ok"] * 4, [_ex(i) for i in range(4)], timeout_s=timeout, num_workers=2
    )
    assert res2.scores == [1.0] * 4 and res2.failures == res2.timeouts == 0
    assert time.monotonic() - t0 < 15.0


def test_pool_rejects_unpicklable_function():
    with pytest.raises(TypeError, match="module-level"):
        score_batch(lambda r, e: 1.0, ["ok"], [_ex(0)], num_workers=1)


def test_pool_close_kills_workers():
    pool = WorkerPool(1)
    out = pool.map(behaving_reward, [("ok", _ex(0))], timeout_s=5)
    assert out[0].status == "ok" and out[0].value == 1.0
    procs = [w.proc for w in pool._workers]
    pool.close()
    assert all(p.poll() is not None for p in procs)


def test_time_limit_nesting():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        with time_limit(0.3):
            try:
                with time_limit(5):
                    time.sleep(2)
            except TimeoutError:  # the inner limit must not claim the outer one's time-out
                pytest.fail("inner limit swallowed the outer time-out")
    assert time.monotonic() - t0 < 1.0
    inner_fired = False
    with time_limit(5):
        try:
            with time_limit(0.2):
                time.sleep(2)
        except TimeoutError:
            inner_fired = True
        time.sleep(0.05)  # the outer block continues normally
    assert inner_fired


def test_time_limit_is_noop_in_threads():
    box = {}

    def run():
        with time_limit(0.05):
            time.sleep(0.2)
        box["done"] = True

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert box == {"done": True}
