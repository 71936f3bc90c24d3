"""Evaluation: pass@k (unbiased), maj@k, diversity and style metrics, the eval runner and reports.

``import dphrl.evaluation`` stays light: the metrics are pure Python; the runner (transformers, tqdm)
and the report (matplotlib) load on first use of ``evaluate``/``rescore``/``write_report``.
"""

from __future__ import annotations

from typing import Any

from dphrl.evaluation.metrics import ks_for, maj_at_k, pass_at_k, pass_at_k_curve

__all__ = [
    "compare_to_base",
    "evaluate",
    "format_table",
    "ks_for",
    "maj_at_k",
    "pass_at_k",
    "pass_at_k_curve",
    "print_table",
    "rescore",
    "write_report",
]

_LAZY = {
    "evaluate": "dphrl.evaluation.runner",
    "rescore": "dphrl.evaluation.runner",
    "compare_to_base": "dphrl.evaluation.runner",
    "format_table": "dphrl.evaluation.runner",
    "write_report": "dphrl.evaluation.report",
    "print_table": "dphrl.evaluation.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dphrl.evaluation' has no attribute {name!r}")
