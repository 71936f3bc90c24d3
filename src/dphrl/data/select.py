"""Select problems of a dataset by id or by field value (``dphrl eval --ids / --ids-file / --where``).

A ``--where field=value`` filter compares ``value`` with the example's field as text: a field of
:class:`~dphrl.data.example.Example` (``id``, ``answer``, ``task``, ``gold_sql``, ``db_path``) or a key
of its ``meta`` (``level``, ``subject``, ``difficulty``, ``db_id``, a JSONL row's own columns, ...).
Several filters must all match. Unknown ids, unknown fields and filters that match nothing are
refused with what there is instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dphrl.data.example import Example
from dphrl.errors import UserError

__all__ = ["example_field", "read_ids_file", "select_examples"]

_TOP_FIELDS = ("id", "answer", "task", "gold_sql", "db_path")
_MISSING = object()


def example_field(ex: Example, field: str) -> Any:
    """``ex.<field>`` for a top-level field, else ``ex.meta[field]`` (a sentinel when absent)."""
    if field in _TOP_FIELDS:
        return getattr(ex, field)
    return ex.meta.get(field, _MISSING)


def read_ids_file(path: str | Path) -> list[str]:
    """Ids from a file: one per line; blank lines and ``#`` comments are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"eval: --ids-file {p} does not exist; give a file with one problem id per line")
    try:
        lines = p.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"eval: --ids-file {p} is not UTF-8 text ({e}); give one problem id per line") from e
    ids = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    if not ids:
        raise UserError(f"eval: --ids-file {p} holds no ids; give one problem id per line")
    return ids


def _shown(values: Iterable[Any], k: int = 8) -> str:
    vals = sorted({str(v) for v in values})
    return ", ".join(vals[:k]) + (f", ... ({len(vals)} in all)" if len(vals) > k else "")


def select_examples(datasets: dict[str, list[Example]], *, ids: Sequence[str] = (),
                    where: Sequence[tuple[str, str]] = ()) -> dict[str, list[Example]]:
    """The examples of each dataset whose id is in ``ids`` (when given) and that match every
    ``(field, value)`` of ``where``, in dataset order.

    Refused: an id in none of the datasets (with close matches), a field no example of a dataset has,
    and a dataset the selection leaves empty (with the values its field has).
    """
    wanted = set(ids)
    if wanted:
        known = {ex.id for exs in datasets.values() for ex in exs}
        unknown = [i for i in dict.fromkeys(ids) if i not in known]
        if unknown:
            close = {i: difflib.get_close_matches(i, sorted(known), n=2) for i in unknown[:5]}
            hints = "; ".join(f"{i!r}" + (f" (did you mean {', '.join(map(repr, c))}?)" if c else "")
                              for i, c in close.items())
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise UserError(f"eval: --ids: {len(unknown)} id(s) in none of the --data sets "
                            f"({', '.join(datasets)}): {hints}{more}. Ids look like: {_shown(known, 4)}")
    out = {}
    for name, exs in datasets.items():
        sel = [ex for ex in exs if ex.id in wanted] if wanted else list(exs)
        if wanted and not sel:
            raise UserError(f"eval: --data {name}: none of the --ids is one of its problems; select ids of "
                            f"every --data set, or evaluate this set on its own")
        for field, value in where:
            have = [example_field(ex, field) for ex in exs]
            if all(v is _MISSING for v in have):
                fields = sorted(set(_TOP_FIELDS) | {k for ex in exs for k in ex.meta})
                close = difflib.get_close_matches(field, fields, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise UserError(f"eval: --where {field}={value}: --data {name} has no field {field!r}.{hint} "
                                f"Its fields: {', '.join(fields)}")
            kept = [ex for ex in sel if str(example_field(ex, field)) == value]
            if not kept:
                present = [example_field(ex, field) for ex in sel]
                raise UserError(f"eval: --where {field}={value} matches no problem of --data {name}"
                                f"{' (after the filters before it)' if len(sel) < len(exs) else ''}; "
                                f"its values there: {_shown(v for v in present if v is not _MISSING)}")
            sel = kept
        out[name] = sel
    return out
