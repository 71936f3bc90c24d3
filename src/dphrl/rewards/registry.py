"""Reward registry: names (or ``module:function``) -> ``fn(response, example) -> float``.

Also :func:`score_batch`, which scores many responses with a time-out per item and counts every
failure and time-out. By default it scores in a pool of killable worker processes, so that a user
reward can neither stall the run (a hang inside one C call), end it (``sys.exit``, ``os._exit``),
flood its terminal, nor outlive it; ``num_workers=0`` scores in-process (fastest, for trusted rewards).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dphrl.data.example import Example
from dphrl.errors import UserError
from dphrl.registry import Registry

log = logging.getLogger(__name__)

RewardFn = Callable[[str, Example], float]

#: Rewards by config name (config key ``reward``); built-ins register themselves on first lookup.
REWARDS: Registry[RewardFn] = Registry(
    "reward",
    config_key="reward",
    builtin_modules=("dphrl.rewards.math", "dphrl.rewards.sql", "dphrl.tasks.styles"),
)

#: A response is *correct* when its reward is >= this: the one definition used by training metrics
#: (``reward/pass_rate``), presample's D_pef split and stored samples, and evaluation (Pass@k). Full
#: credit: partial-credit rewards (e.g. SQL ``partial_credit``) never count as solved, and 0/1 and
#: -1/+1 rewards both work.
CORRECT_THRESHOLD = 1.0


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False) -> Any:
    """Register ``fn(response, example) -> float`` under ``name``; usable as a decorator."""
    return REWARDS.register(name, fn, overwrite=overwrite)


def get_reward(spec: str) -> RewardFn:
    """Look up a reward by registered name or ``package.module:function``."""
    fn = REWARDS.get(spec)
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


def list_rewards() -> list[str]:
    """Names of all registered rewards (built-ins included)."""
    return REWARDS.names()


class RewardFailureError(UserError, RuntimeError):
    """Too many reward evaluations failed (a training step's, or presample's): see
    ``max_reward_failure_frac``. The message names the reward, the counts and the first error."""


@dataclass
class BatchScores:
    """Scores of a batch; failed or timed-out items score 0 and are counted here."""

    scores: list[float]
    failures: int = 0  # reward function raised (sys.exit included), returned a non-number, or its worker died
    timeouts: int = 0  # reward function exceeded its time-out
    errors: dict[int, str] = field(default_factory=dict)  # item index -> message naming the reward
    workers: int = 0  # worker processes that scored the batch (0: in-process)

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


#: ``score_batch(num_workers=AUTO_WORKERS)`` (the default): a pool of :func:`auto_num_workers`
#: killable worker processes, or in-process scoring (with a warning) for a reward that worker
#: processes cannot import.
AUTO_WORKERS = -1
_MAX_AUTO_WORKERS = 8


def auto_num_workers() -> int:
    """Pool size for ``num_workers=-1``: the CPUs this process may use per local rank, in [2, 8].

    At least 2, so that one hanging item never holds up the rest of a batch.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(2, min(_MAX_AUTO_WORKERS, cpus // ranks))


def _unwrap(fn: object) -> object:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def reward_name(fn: object) -> str:
    """``module:qualname`` of a reward (through ``functools.partial``), for messages."""
    target = _unwrap(fn)
    mod = getattr(target, "__module__", None)
    qual = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or type(target).__name__
    return f"{mod}:{qual}" if mod else str(qual)


def worker_unsafe_reason(fn: object) -> str | None:
    """Why ``fn`` cannot run in worker processes (they import it by reference), or None if it can."""
    if getattr(_unwrap(fn), "__module__", None) == "__main__":
        return "it is defined in __main__, which worker processes do not import"
    try:
        pickle.dumps(fn)
    except Exception as e:
        return (
            f"it cannot be pickled ({type(e).__name__}: {str(e)[:200]}): a lambda, closure or local function?"
        )
    return None


def _as_score(x: object) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(
            f"reward returned {type(x).__name__} that is not a number ({str(e)[:200]})"
        ) from None
    if not math.isfinite(v):
        raise ValueError(f"reward returned a non-finite value {v!r}")
    return v


def _score_one(fn: RewardFn, response: str, example: Example) -> float:
    """``fn(response, example)`` as a finite float; run in a worker, so only a float travels back."""
    return _as_score(fn(response, example))


class _SigintWatch:
    """Tells the user's Ctrl-C from a ``KeyboardInterrupt`` that reward code raises itself.

    In the main thread the current Python ``SIGINT`` handler is wrapped, for the batch, to note that a
    signal came (then it runs unchanged). A ``KeyboardInterrupt`` with no ``SIGINT`` behind it was
    raised by the reward and is contained; after a ``SIGINT``, or when the handler was replaced
    meanwhile (then we cannot tell), it stops the run. Outside the main thread a ``KeyboardInterrupt``
    can only come from code (Python delivers signals to the main thread), so it is contained.
    """

    def __init__(self) -> None:
        self.seen = False
        self._prev: Any = None
        self._handler: Any = None

    def __enter__(self) -> _SigintWatch:
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGINT)
            if callable(prev):

                def handler(signum: int, frame: Any) -> None:
                    self.seen = True
                    prev(signum, frame)

                signal.signal(signal.SIGINT, handler)
                self._prev, self._handler = prev, handler
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handler is not None:
            signal.signal(signal.SIGINT, self._prev)

    def from_user(self) -> bool:
        """Whether a ``KeyboardInterrupt`` seen now may come from a ``SIGINT`` (the user)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self.seen:
            return True
        current = signal.getsignal(signal.SIGINT)
        return current is not self._handler if self._handler is not None else callable(current)


def _call_in_process(
    fn: RewardFn, response: str, example: Example, timeout_s: float, sigint: _SigintWatch
) -> tuple[str, float | str]:
    """``("ok", score)``, ``("error", message)`` or ``("timeout", message)`` for one in-process item.

    Contains every ``BaseException`` the reward raises (``SystemExit``, ``GeneratorExit``, custom
    ones) except the user's Ctrl-C (see :class:`_SigintWatch`) and an enclosing ``time_limit``.
    """
    from dphrl.rewards.sandbox import TimeLimitExceeded, describe_exception, time_limit

    try:
        with time_limit(timeout_s):
            try:
                return "ok", _as_score(fn(response, example))
            except TimeLimitExceeded:
                raise  # ours becomes a TimeoutError just below; an enclosing limit's propagates
            except KeyboardInterrupt as e:
                if sigint.from_user():
                    raise
                return "error", describe_exception(e)
            except BaseException as e:  # noqa: BLE001 - the reward must not end the run
                return ("timeout" if isinstance(e, TimeoutError) else "error"), describe_exception(e)
    except TimeoutError as e:  # our time limit (a slow __str__ of the reward's exception included)
        return "timeout", str(e)


_warned_in_process: set[str] = set()


def score_batch(
    fn: RewardFn,
    responses: list[str],
    examples: list[Example],
    *,
    timeout_s: float = 10.0,
    num_workers: int = AUTO_WORKERS,
) -> BatchScores:
    """Score many responses; a failing item scores 0 and is counted with a message, never silently.

    ``num_workers``:

    * ``-1`` (``AUTO_WORKERS``, default; any negative value): a pool of :func:`auto_num_workers`
      worker processes if ``fn`` is importable by reference (a registered reward, a module-level
      function, a ``functools.partial`` of one), else in-process with a one-time warning.
    * ``N > 0``: a persistent pool of N worker processes (:mod:`dphrl.rewards.sandbox`). Each item gets
      ``timeout_s`` of wall-clock time, after which its worker is killed with every process it started
      (``setsid`` daemons included) and replaced, even when stuck inside one C call; N hanging items
      cost one time-out. ``sys.exit``, ``os._exit`` or a crash fail only their item; what the reward
      prints is captured (its tail goes into the item's message); workers and what they started die
      with this process, however it ends, and run under a memory limit (``DPHRL_REWARD_MEMORY_MB``).
      ``fn`` must be importable by reference (``TypeError`` otherwise).
    * ``0``: in-process, one item after another: fastest, for trusted rewards. Every exception the
      reward raises fails its item (``SystemExit`` included; a ``KeyboardInterrupt`` only if no
      ``SIGINT`` came: a real Ctrl-C stops the run). In the main thread each item is bounded by
      ``timeout_s`` (``SIGALRM``), which cannot stop a hang inside one C call; elsewhere items run
      unbounded. ``os._exit`` ends the process and printed output reaches the terminal.

    Measured on 2 shared cores: the pool adds about 0.1 ms per item to a trivial reward (128 items
    of ``number``: ~4 ms in-process, ~10-20 ms in 2 workers) and is faster than in-process for slow
    (symbolic) items once there are 2 or more CPUs.
    """
    from dphrl.rewards.sandbox import get_pool

    if len(responses) != len(examples):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(examples)} examples")
    out = BatchScores([0.0] * len(responses))
    if not responses:
        return out
    name = reward_name(fn)
    workers = num_workers
    if workers != 0:
        reason = worker_unsafe_reason(fn)
        if reason is not None and workers > 0:
            raise TypeError(
                f"reward {name} cannot run in worker processes: {reason}. Use a module-level function "
                "(not a lambda, closure or function defined in __main__), or num_workers=0"
            )
        if reason is not None:
            if name not in _warned_in_process:
                _warned_in_process.add(name)
                log.warning(
                    "reward %s scored in-process: %s. A hang inside C code cannot be stopped there; "
                    "define it at module level to score it in killable worker processes", name, reason,
                )
            workers = 0
        elif workers < 0:
            workers = auto_num_workers()
    out.workers = workers
    if workers > 0:
        mod = getattr(_unwrap(fn), "__module__", None)
        outcomes = get_pool(workers).map(
            _score_one,
            [(fn, r, ex) for r, ex in zip(responses, examples)],
            timeout_s,
            preload=[mod] if mod else [],
        )
        for i, o in enumerate(outcomes):
            if o.status == "ok":
                try:
                    out.scores[i] = _as_score(o.value)
                    continue
                except Exception as e:
                    o.status, o.error = "error", str(e)
            if o.status == "timeout":
                out.timeouts += 1
            else:
                out.failures += 1
            said = f"; it printed: {o.output}" if o.output else ""
            out.errors[i] = f"reward {name}: {o.error or o.status}{said}"
    else:
        with _SigintWatch() as sigint:
            for i, (r, ex) in enumerate(zip(responses, examples)):
                status, value = _call_in_process(fn, r, ex, timeout_s, sigint)
                if status == "ok":
                    out.scores[i] = float(value)
                    continue
                if status == "timeout":
                    out.timeouts += 1
                else:
                    out.failures += 1
                out.errors[i] = f"reward {name}: {value}"
    if out.failures or out.timeouts:
        log.warning(
            "score_batch(%s): %d of %d items failed, %d timed out (scored 0); first: %s",
            name, out.failures, len(responses), out.timeouts, next(iter(out.errors.values())),
        )
    return out
