"""Rewards that start processes, for the containment tests (module-level: worker processes import it).

:func:`spawn_reward` reads a JSON spec from the response: ``dir`` (where every process it starts
writes its pid), ``daemons`` (``setsid -f``: a new session, re-parented when ``setsid`` exits, as a
real daemon), ``forks`` (plain ``os.fork`` children, same process group) and ``then``: ``return``
(score 1.0), ``hang`` (sleep) or ``exit`` (``os._exit``). Every process it starts sleeps for 600 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

#: Set in the environment of the processes a test starts; :func:`kill_marked` only kills those.
MARK_VAR = "DPHRL_SPAWN_TEST_MARK"


def spawn_spec(d: Path | str, *, daemons: int = 0, forks: int = 0, then: str = "return") -> str:
    return json.dumps({"dir": str(d), "daemons": daemons, "forks": forks, "then": then})


def spawn_reward(response: str, example: object) -> float:
    spec = json.loads(response)
    d = Path(spec["dir"])
    (d / f"worker-{os.getpid()}.pid").write_text(str(os.getpid()))
    want = []
    for _ in range(spec.get("daemons", 0)):
        name = f"daemon-{uuid.uuid4().hex}"
        tmp, final = d / f"{name}.tmp", d / f"{name}.pid"
        # the daemon keeps the worker's stdout (the pool's pipe) open, as a careless daemon would
        subprocess.run(
            ["setsid", "-f", "sh", "-c", f'echo $$ > "{tmp}" && mv "{tmp}" "{final}" && exec sleep 600'],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        want.append(final)
    for _ in range(spec.get("forks", 0)):
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(600)
            finally:
                os._exit(0)
        (d / f"fork-{pid}.pid").write_text(str(pid))
    deadline = time.monotonic() + 20
    while not all(p.exists() for p in want) and time.monotonic() < deadline:
        time.sleep(0.01)
    then = spec.get("then", "return")
    if then == "hang":
        time.sleep(600)
    if then == "exit":
        os._exit(3)
    return 1.0


def recorded_pids(d: Path, prefix: str = "") -> list[int]:
    """The pids written to ``d`` (``worker``, ``daemon`` or ``fork`` files; all with no prefix)."""
    out = []
    for p in d.glob(f"{prefix}*.pid"):
        try:
            out.append(int(p.read_text().strip()))
        except ValueError:  # being written
            pass
    return out


def gone(pid: int) -> bool:
    """Whether ``pid`` has stopped running (absent or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still running after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if not gone(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def kill_marked(pids: list[int], mark: str) -> None:
    """SIGKILL those of ``pids`` whose environment carries ``MARK_VAR=mark`` (never anything else)."""
    needle = f"{MARK_VAR}={mark}".encode()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


def torch_probe() -> float:
    """Import torch and multiply two matrices (a reward that uses torch on CPU)."""
    import torch

    x = torch.ones(256, 256)
    return float((x @ x)[0, 0])
