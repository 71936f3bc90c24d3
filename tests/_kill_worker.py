"""``dphrl train`` in a subprocess, with a SIGKILL injected at a precise moment (or a slow step).

``python tests/_kill_worker.py POINT N -- <dphrl train arguments>`` runs ``dphrl.cli.main(["train", ...])``
after patching one function so that the process SIGKILLs itself the N-th time it reaches POINT:

* ``prune``      : inside :func:`dphrl.fsutil.remove_dir`, after the rename, before the delete
                   (a checkpoint being pruned);
* ``ckpt_write`` : while a checkpoint's files are being written (after its trainer_state.json);
* ``final``      : inside :func:`dphrl.fsutil.replace_dir` for ``final/`` (temp written, not swapped);
* ``metrics``    : inside the atomic rewrite of ``metrics.jsonl`` at resume (temp written, not renamed);
* ``none``       : no kill; with N > 0 every step sleeps N/10 s (time for a test to send a signal).

No test hook lives in the package: the kill is injected here by wrapping the real functions.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main() -> int:
    point, n = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    import torch

    torch.set_num_threads(1)
    from dphrl import checkpoint, fsutil, trainer

    hits = {"n": 0}

    def hit() -> None:
        hits["n"] += 1
        if hits["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "prune":
        real_remove = fsutil.remove_dir

        def remove_dir(path):  # rename (as the real one does), then die before deleting
            from pathlib import Path

            p = Path(path)
            if p.parent.name == "checkpoints":
                doomed = p.with_name(f".deleting-{p.name}-killed")
                os.replace(p, doomed)
                hit()
                return real_remove(doomed)
            return real_remove(path)

        checkpoint.remove_dir = remove_dir
    elif point == "ckpt_write":
        real_write = checkpoint.atomic_write_text

        def write(path, text):
            real_write(path, text)
            if "/checkpoints/.step_" in str(path) and str(path).endswith("trainer_state.json"):
                hit()

        checkpoint.atomic_write_text = write
    elif point == "final":
        real_replace = fsutil.replace_dir

        def replace_dir(tmp, dst):
            if str(dst).endswith("final"):
                hit()
            return real_replace(tmp, dst)

        checkpoint.replace_dir = replace_dir
    elif point == "metrics":
        real_write = fsutil.atomic_write_bytes

        def atomic_write_bytes(path, data):
            if str(path).endswith("metrics.jsonl"):
                from pathlib import Path

                tmp = Path(path).with_name(".metrics.jsonl.tmp-killed")
                tmp.write_bytes(data[: len(data) // 2])  # half written, never renamed
                hit()
            return real_write(path, data)

        fsutil.atomic_write_bytes = atomic_write_bytes
    elif point == "none" and n > 0:
        real_collect = trainer.Trainer.collect_rollouts

        def slow_collect(self):
            time.sleep(n / 10)
            return real_collect(self)

        trainer.Trainer.collect_rollouts = slow_collect
    from dphrl.cli import main as cli_main

    return cli_main(["train", *args])


if __name__ == "__main__":
    sys.exit(main())
