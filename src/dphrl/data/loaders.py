"""Loaders producing :class:`~dphrl.data.example.Example` records from benchmark files.

Formats: GSM8K (jsonl), MATH / MATH-500 (jsonl), Spider (directory), BIRD (directory), generic jsonl,
parquet, and Hugging Face ``datasets`` from local files; :func:`load_dataset_spec` dispatches on a
``type`` key (this is what the trainer config uses). Every example's ``meta`` records its source file
and line (or entry/row index). A malformed row (missing field, invalid JSON or UTF-8) raises
``ValueError`` naming the file, the line and the problem, and how to fix it. Loaders return
:class:`Examples`, a ``list`` with a ``skipped`` count (e.g. Spider examples whose database file is
missing). :func:`resolve_dataset_spec` checks a spec against its loader's signature without reading
data (the config does this at load time); a spec that gives no example raises ``ValueError``.

Dataset types are the entries of :data:`dphrl.tasks.TASKS` (loader, path keyword, reward, hooks): this
module only reads that table, so a new type is one entry there (or a ``package.module:attr`` type).
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dphrl.data.example import Example
from dphrl.data.templates import math_messages, sql_messages
from dphrl.errors import UserError
from dphrl.tasks import TASKS, TaskSpec

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class Examples(list):
    """A list of examples that also reports how many source rows were skipped (and why), and the dataset
    type it was loaded as (``dataset_type``, set by :func:`load_dataset_spec`; see :mod:`dphrl.tasks`)."""

    def __init__(
        self, items: Iterable[Example] = (), skipped: int = 0, skip_reasons: dict[str, int] | None = None,
        dataset_type: str | None = None,
    ):
        super().__init__(items)
        self.skipped = skipped
        self.skip_reasons: dict[str, int] = dict(skip_reasons or {})
        self.dataset_type = dataset_type


def _utf8_error(path: Path, data: bytes, e: UnicodeDecodeError, line_offset: int = 0) -> ValueError:
    """ValueError naming the file, the line and the byte of an invalid UTF-8 sequence."""
    lineno = line_offset + data.count(b"\n", 0, e.start) + 1
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return ValueError(f"{path}, line {lineno}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); "
                      "the file must be UTF-8 encoded: re-save it as UTF-8 or fix the line")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line; bad UTF-8 or JSON -> ValueError with the
    line."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is tolerated
            except UnicodeDecodeError as e:
                raise _utf8_error(path, raw, e, lineno - 1) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {lineno}: invalid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _need(row: dict[str, Any], field: str, where: str, hint: str) -> Any:
    if field not in row or row[field] is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise ValueError(f"{where}: missing field {field!r} (fields present: {present}). {hint}")
    return row[field]


def _take(examples: list[Example], limit: int | None) -> list[Example]:
    return examples if limit is None else examples[: max(int(limit), 0)]


# ----------------------------------------------------------------------------------------------------
# Math


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution (commas removed), or None."""
    if "####" not in solution:
        return None
    ans = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return ans or None


def load_gsm8k(path: PathLike, *, limit: int | None = None, system: str | None = None) -> Examples:
    """GSM8K jsonl (``question``, ``answer`` ending in ``#### n``) -> math examples (answer = n)."""
    path = Path(path)
    out = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}, line {lineno}"
        hint = (
            "GSM8K rows need 'question' and 'answer' (a solution ending in '#### <number>'); "
            "fix or remove the line."
        )
        q = _need(row, "question", where, hint)
        sol = str(_need(row, "answer", where, hint))
        ans = gsm8k_final_answer(sol)
        if ans is None:
            raise ValueError(f"{where}: field 'answer' has no final '#### <number>' line. {hint}")
        out.append(
            Example(
                id=f"gsm8k-{path.stem}-{lineno}",
                prompt=math_messages(str(q), system=system),
                answer=ans,
                task="math",
                meta={"source": str(path), "line": lineno, "dataset": "gsm8k", "solution": sol},
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return Examples(out)


def load_math(path: PathLike, *, limit: int | None = None, system: str | None = None) -> Examples:
    """MATH / MATH-500 jsonl (``problem`` and ``answer``, or ``solution`` with a ``\\boxed{}`` answer)."""
    path = Path(path)
    out = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}, line {lineno}"
        hint = "MATH rows need 'problem' and either 'answer' or a 'solution' containing \\boxed{...}."
        problem = _need(row, "problem", where, hint)
        ans = row.get("answer")
        if ans is None or str(ans).strip() == "":
            if row.get("solution") is None:
                raise ValueError(
                    f"{where}: missing field 'answer' (and no 'solution' to take it from). {hint}"
                )
            from dphrl.rewards.math import extract_answer  # only needed here (imports sympy)

            ans = extract_answer(str(row["solution"]))
            if ans is None:
                raise ValueError(
                    f"{where}: no 'answer' field and no \\boxed{{}} answer in 'solution'. {hint}"
                )
        meta = {"source": str(path), "line": lineno, "dataset": "math"}
        meta.update({k: row[k] for k in ("subject", "level", "unique_id", "type") if k in row})
        out.append(
            Example(
                id=str(row.get("unique_id") or f"math-{path.stem}-{lineno}"),
                prompt=math_messages(str(problem), system=system),
                answer=str(ans).strip(),
                task="math",
                meta=meta,
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return Examples(out)


# ----------------------------------------------------------------------------------------------------
# Text-to-SQL


def _load_json_list(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a leading BOM is tolerated
    except UnicodeDecodeError as e:
        raise _utf8_error(path, raw, e) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    return data


def _sql_examples(
    rows: list[dict[str, Any]], path: Path, db_root: Path, *, dataset: str, sql_field: str, task: str,
    sample_rows: int, limit: int | None, system: str | None, evidence_field: str | None,
) -> Examples:
    out: list[Example] = []
    missing: dict[str, int] = {}
    for k, row in enumerate(rows):
        where = f"{path}, entry {k} (0-based)"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        hint = f"{dataset} entries need 'db_id', 'question' and {sql_field!r}; fix or remove the entry."
        db_id = str(_need(row, "db_id", where, hint))
        question = str(_need(row, "question", where, hint))
        gold = str(_need(row, sql_field, where, hint))
        db_path = db_root / db_id / f"{db_id}.sqlite"
        if not db_path.is_file():
            missing[db_id] = missing.get(db_id, 0) + 1
            continue
        evidence = str(row.get(evidence_field) or "") if evidence_field else ""
        meta: dict[str, Any] = {
            "source": str(path),
            "line": k,
            "dataset": dataset,
            "db_id": db_id,
            "question": question,
        }
        if evidence_field:
            meta["evidence"] = evidence
        for key in ("difficulty", "question_id"):
            if key in row:
                meta[key] = row[key]
        out.append(
            Example(
                id=f"{dataset}-{path.stem}-{row.get('question_id', k)}",
                prompt=sql_messages(
                    question, db_path, evidence=evidence or None, sample_rows=sample_rows, system=system
                ),
                gold_sql=gold,
                db_path=str(db_path),
                task=task,
                meta=meta,
            )
        )
        if limit is not None and len(out) >= limit:
            break
    skipped = sum(missing.values())
    if skipped:
        log.warning(
            "%s: skipped %d examples whose database file is missing (%s) under %s",
            path, skipped, ", ".join(f"{d}: {n}" for d, n in sorted(missing.items())), db_root,
        )
    return Examples(
        out, skipped=skipped, skip_reasons={f"missing database {d}": n for d, n in missing.items()}
    )


def load_spider(
    directory: PathLike,
    split: str = "dev",
    *,
    sample_rows: int = 3,
    limit: int | None = None,
    system: str | None = None,
) -> Examples:
    """Spider: ``<dir>/<split>.json`` (``question``, ``query``, ``db_id``) with databases in
    ``<dir>/database/<db_id>/<db_id>.sqlite`` (``test_database/`` for the test split when present).

    ``split`` may also be a file name (``train_spider.json``). Examples whose database file is missing
    are skipped; the count is logged and available as ``.skipped`` on the result.
    """
    d = Path(directory)
    name = split if split.endswith(".json") else {"train": "train_spider"}.get(split, split) + ".json"
    db_root = d / "database"
    if split == "test" and (d / "test_database").is_dir():
        db_root = d / "test_database"
    rows = _load_json_list(d / name)
    return _sql_examples(rows, d / name, db_root, dataset="spider", sql_field="query", task="sql",
                         sample_rows=sample_rows, limit=limit, system=system, evidence_field=None)


def load_bird(
    directory: PathLike,
    split: str = "dev",
    *,
    sample_rows: int = 3,
    limit: int | None = None,
    system: str | None = None,
) -> Examples:
    """BIRD: ``<dir>/<split>.json`` (``question``, ``evidence``, ``SQL``, ``db_id``) with databases in
    ``<dir>/<split>_databases/<db_id>/<db_id>.sqlite`` (or ``<dir>/databases/``). The evidence is
    appended to the question in the prompt; examples with a missing database are skipped."""
    d = Path(directory)
    name = split if split.endswith(".json") else f"{split}.json"
    stem = Path(name).stem
    db_root = next((p for p in (d / f"{stem}_databases", d / "databases", d / "database") if p.is_dir()),
                   d / f"{stem}_databases")
    rows = _load_json_list(d / name)
    return _sql_examples(rows, d / name, db_root, dataset="bird", sql_field="SQL", task="bird",
                         sample_rows=sample_rows, limit=limit, system=system, evidence_field="evidence")


# ----------------------------------------------------------------------------------------------------
# Generic row formats (jsonl, parquet, HF datasets)


def _rows_to_examples(
    rows: Iterable[tuple[int, dict[str, Any]]],
    source: str,
    unit: str,
    *,
    prompt_field: str,
    answer_field: str | None,
    task: str,
    id_field: str | None,
    gold_sql_field: str | None,
    db_path_field: str | None,
    template: str,
    system: str | None,
    base_dir: Path | None,
    limit: int | None,
) -> Examples:
    if template not in ("none", "math", "sql"):
        raise ValueError(f"template must be 'none', 'math' or 'sql', got {template!r}")
    out = []
    for n, row in rows:
        where = f"{source}, {unit} {n}"
        hint = (f"each row needs {prompt_field!r}" + (f" and {answer_field!r}" if answer_field else "")
                + "; fix the row or pass prompt_field=/answer_field= naming the right columns.")
        prompt = _need(row, prompt_field, where, hint)
        answer = None if answer_field is None else str(_need(row, answer_field, where, hint))
        gold_sql = None if gold_sql_field is None else str(_need(row, gold_sql_field, where, hint))
        db_path = None
        if db_path_field is not None:
            db_path = str(_need(row, db_path_field, where, hint))
            if base_dir is not None and not os.path.isabs(db_path):
                db_path = str(base_dir / db_path)
        if isinstance(prompt, str):
            if template == "math":
                messages = math_messages(prompt, system=system)
            elif template == "sql":
                if db_path is None:
                    raise ValueError(
                        f"{where}: template 'sql' needs db_path_field to build the schema prompt"
                    )
                messages = sql_messages(prompt, db_path, system=system)
            else:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}
                ]
        elif isinstance(prompt, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt
        ):
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        else:
            raise ValueError(f"{where}: field {prompt_field!r} must be a string or a list of "
                             "{'role': ..., 'content': ...} messages")
        used = {prompt_field, answer_field, gold_sql_field, db_path_field, id_field}
        meta = {
            k: v
            for k, v in row.items()
            if k not in used and isinstance(v, (str, int, float, bool, type(None)))
        }
        meta.update({"source": source, "line": n})
        ex_id = (
            str(row[id_field]) if id_field and row.get(id_field) is not None else f"{Path(source).stem}-{n}"
        )
        out.append(
            Example(
                id=ex_id,
                prompt=messages,
                answer=answer,
                gold_sql=gold_sql,
                db_path=db_path,
                task=task,
                meta=meta,
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return Examples(out)


def load_jsonl(
    path: PathLike,
    *,
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    task: str = "math",
    id_field: str | None = None,
    gold_sql_field: str | None = None,
    db_path_field: str | None = None,
    template: str = "none",
    system: str | None = None,
    limit: int | None = None,
) -> Examples:
    """Generic jsonl: ``prompt_field`` holds a string (wrapped by ``template``: ``none`` = one user
    message, ``math``, ``sql``) or a list of chat messages. Relative database paths are resolved
    against the file's directory; other scalar fields go to ``meta``."""
    path = Path(path)
    return _rows_to_examples(
        _read_jsonl(path), str(path), "line", prompt_field=prompt_field, answer_field=answer_field, task=task,
        id_field=id_field, gold_sql_field=gold_sql_field, db_path_field=db_path_field, template=template,
        system=system, base_dir=path.parent, limit=limit,
    )


def load_parquet(
    path: PathLike,
    *,
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    task: str = "math",
    id_field: str | None = None,
    gold_sql_field: str | None = None,
    db_path_field: str | None = None,
    template: str = "none",
    system: str | None = None,
    limit: int | None = None,
) -> Examples:
    """A parquet file, with the same options as :func:`load_jsonl` (rows numbered from 0)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    table = pq.read_table(path)

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        k = 0
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                yield k, row
                k += 1

    return _rows_to_examples(
        rows(), str(path), "row", prompt_field=prompt_field, answer_field=answer_field, task=task,
        id_field=id_field, gold_sql_field=gold_sql_field, db_path_field=db_path_field, template=template,
        system=system, base_dir=path.parent, limit=limit,
    )


_HF_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}


def load_hf(
    path: PathLike,
    *,
    split: str = "train",
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    task: str = "math",
    id_field: str | None = None,
    gold_sql_field: str | None = None,
    db_path_field: str | None = None,
    template: str = "none",
    system: str | None = None,
    limit: int | None = None,
) -> Examples:
    """A Hugging Face ``datasets`` dataset from local files only: a ``save_to_disk`` directory, a data
    file (json/jsonl/parquet/csv/arrow), or a directory of data files. Same options as :func:`load_jsonl`."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"local dataset not found: {p} (load_hf reads local files only)")
    if p.is_dir() and (
        (p / "dataset_info.json").exists()
        or (p / "dataset_dict.json").exists()
        or (p / "state.json").exists()
    ):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{p}: no split {split!r}; available: {sorted(ds)}")
            ds = ds[split]
    elif p.is_file():
        builder = _HF_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{p}: unknown data file type {p.suffix!r}; expected one of {sorted(_HF_BUILDERS)}"
            )
        ds = datasets.load_dataset(builder, data_files={split: str(p)}, split=split)
    else:
        ds = datasets.load_dataset(str(p), split=split)
    if limit is not None:
        ds = ds.select(range(min(int(limit), len(ds))))
    return _rows_to_examples(
        enumerate(ds), str(p), "row", prompt_field=prompt_field, answer_field=answer_field, task=task,
        id_field=id_field, gold_sql_field=gold_sql_field, db_path_field=db_path_field, template=template,
        system=system, base_dir=p if p.is_dir() else p.parent, limit=limit,
    )


# ----------------------------------------------------------------------------------------------------
# Spec dispatch


class _LoaderView(Mapping):
    """Read-only view ``type -> loader`` (function or ``"module:function"``) of :data:`dphrl.tasks.TASKS`."""

    def __getitem__(self, kind: str) -> Callable[..., list[Example]] | str:
        return TASKS[kind].loader

    def __iter__(self) -> Iterator[str]:
        return iter(TASKS)

    def __len__(self) -> int:
        return len(TASKS)

    def __repr__(self) -> str:
        return f"LOADERS({TASKS.names()})"


#: Dataset type -> loader: a read-only view of :data:`dphrl.tasks.TASKS` (register new types there).
LOADERS: Mapping[str, Callable[..., list[Example]] | str] = _LoaderView()


#: Spec keys of every dataset type, besides its loader's own keyword options.
SPEC_KEYS = ("type", "path", "limit", "seed")

#: Names other tools use for a spec key -> the key meant (the suggestion for an unknown key).
_SPEC_ALIASES = {
    "file": "path", "data_file": "path", "data_files": "path", "data_path": "path", "dir": "path",
    "max_samples": "limit", "num_samples": "limit", "n_samples": "limit", "max_examples": "limit",
    "shuffle_seed": "seed", "kind": "type", "format": "type", "loader": "type", "name": "type",
}


class DatasetSpecError(UserError, ValueError):
    """A dataset spec is wrong (found before any data is read); ``key`` is the spec key at fault, or None."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _suggest(word: str, valid: Iterable[str], aliases: dict[str, str] | None = None) -> str:
    """`` Did you mean 'x'?`` for the closest valid name (an alias first), or ''."""
    valid = list(valid)
    target = (aliases or {}).get(word)
    if target in valid:
        return f" Did you mean {target!r}?"
    close = difflib.get_close_matches(word, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _infer_type(path: Path) -> str:
    if path.is_dir():
        if (path / "database").is_dir() and any(
            (path / f).is_file() for f in ("dev.json", "train_spider.json")
        ):
            return "spider"
        if any(path.glob("*_databases")):
            return "bird"
        return "hf"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise DatasetSpecError(f"cannot infer the dataset type of {path}; use a dict spec with 'type' "
                           f"({TASKS.names()})", key="type")


def dataset_task(kind: str) -> TaskSpec:
    """The :class:`~dphrl.tasks.TaskSpec` of dataset type ``kind`` (registered or ``package.module:attr``)."""
    if isinstance(kind, str) and ":" in kind:
        try:
            return TASKS.get(kind)
        except ValueError as e:
            raise DatasetSpecError(str(e), key="type") from e
    if not isinstance(kind, str) or kind not in TASKS:
        raise DatasetSpecError(f"unknown dataset type {kind!r}; valid types: {TASKS.names()} or "
                               "'package.module:attr' for your own." + _suggest(str(kind), TASKS), key="type")
    return TASKS[kind]


def _loader_of(task: TaskSpec) -> tuple[Callable[..., list[Example]], dict[str, inspect.Parameter]]:
    try:
        fn = task.load_fn()
        return fn, dict(inspect.signature(fn).parameters)
    except (ValueError, TypeError) as e:
        raise DatasetSpecError(f"dataset type {task.name!r}: {e}", key="type") from e


def dataset_loader(kind: str) -> tuple[Callable[..., list[Example]], dict[str, inspect.Parameter]]:
    """The loader of dataset type ``kind`` and its keyword parameters (the options its spec may give)."""
    return _loader_of(dataset_task(kind))


@dataclass
class ResolvedSpec:
    """A checked dataset spec: the loader to call and its keyword arguments
    (``limit``/``seed`` applied after)."""

    kind: str
    fn: Callable[..., list[Example]]
    kwargs: dict[str, Any]
    limit: int | None
    seed: int | None
    path: Path | None
    task: TaskSpec | None = None


def resolve_dataset_spec(
    spec: dict[str, Any] | str | os.PathLike, *, base_dir: PathLike | None = None, strict: bool = True
) -> ResolvedSpec | None:
    """Check ``spec`` against the signature of the loader its ``type`` picks, reading no data file.

    Raises :class:`DatasetSpecError` (with the spec key at fault and a close-match suggestion) for an
    unknown type or option, a missing ``path`` or required option, or a bad ``limit``/``seed``. A
    spec without ``type`` infers it from ``path``. With ``strict=False`` (config time: the data may live
    on another machine, the spec may be partial) a missing ``path`` or required option is accepted, and
    a spec whose type is unknown (absent, and not inferable from an absent path) returns None once its
    keys are checked against every loader's.
    """
    if isinstance(spec, str | os.PathLike):
        s = str(spec)
        head, sep, tail = s.partition(":")
        spec = {"type": head, "path": tail} if sep and head in TASKS else {"path": s}
    if not isinstance(spec, dict):
        raise DatasetSpecError(f"dataset spec must be a mapping {{type: ..., path: ...}} or a string, got "
                               f"{type(spec).__name__} {spec!r}")
    opts = {str(k): v for k, v in spec.items()}
    limit = opts.pop("limit", None)
    seed = opts.pop("seed", None)
    kind = opts.pop("type", None)
    raw_path = opts.pop("path", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetSpecError(f"'limit' must be an integer >= 1 (or absent for all examples), got {limit!r}",
                               key="limit")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DatasetSpecError(
            f"'seed' must be an integer (or absent for the file order), got {seed!r}", key="seed"
        )
    path = None
    if raw_path is not None:
        if not isinstance(raw_path, str | os.PathLike) or not str(raw_path):
            raise DatasetSpecError(f"'path' must be a file or directory path, got {raw_path!r}", key="path")
        path = Path(os.path.expanduser(str(raw_path)))
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
    if kind is None:
        try:
            if path is None:
                raise DatasetSpecError(
                    "dataset spec needs a 'type' (or a 'path' to infer it from); valid types: "
                    f"{TASKS.names()}",
                    key="type",
                )
            kind = _infer_type(path)
        except DatasetSpecError:
            if strict or (path is not None and path.exists()):
                raise
            # the type is not known yet: every key must mean something to a loader
            _check_any_loader_keys(opts)
            return None
    task = dataset_task(kind)
    fn, params = _loader_of(task)
    arg = task.path_arg
    if arg is not None:
        if path is None and arg not in opts and strict:
            raise DatasetSpecError(f"dataset type {kind!r} needs 'path'", key="path")
        if path is not None:
            opts[arg] = path
    elif path is not None:
        raise DatasetSpecError(f"dataset type {kind!r} takes no 'path'", key="path")
    if task.seeded and seed is not None and "seed" in params:
        opts["seed"], seed = seed, None  # generators are seeded directly
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [] if takes_any else [k for k in opts if k not in named]
    if unknown:
        valid = sorted(named - {"limit"} | {"type", "limit", "seed"} | ({"path"} if arg else set()))
        raise DatasetSpecError(f"dataset type {kind!r}: unknown option(s) {sorted(unknown)}; valid: {valid}."
                               + _suggest(unknown[0], valid, _SPEC_ALIASES), key=unknown[0])
    for n, p in params.items():
        if strict and n in named and p.default is p.empty and n not in opts:
            raise DatasetSpecError(f"dataset type {kind!r} needs {n!r}", key=n)
    if limit is not None and seed is None and "limit" in params:
        opts["limit"] = limit  # loaders stop early
    return ResolvedSpec(kind, fn, opts, limit, seed, path, task)


def _check_any_loader_keys(opts: dict[str, Any]) -> None:
    """Refuse keys that no loader takes (for a spec whose type is not known yet)."""
    valid = set(SPEC_KEYS)
    for kind in TASKS:
        valid |= {
            n
            for n, p in dataset_loader(kind)[1].items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
    unknown = [k for k in opts if k not in valid]
    if unknown:
        raise DatasetSpecError(
            f"unknown dataset option(s) {sorted(unknown)} (no loader takes them); valid: "
            f"{sorted(valid)}." + _suggest(unknown[0], valid, _SPEC_ALIASES),
            key=unknown[0],
        )


def check_dataset_spec(spec: dict[str, Any] | str) -> None:
    """Config-time check of a dataset spec without reading its data files: the type, every key against
    the loader's options (or any loader's while the type is not known), ``limit`` and ``seed``. A
    missing ``path`` or required option is left to load time (a config may hold a partial spec)."""
    resolve_dataset_spec(spec, strict=False)


def _describe_spec(spec: Any) -> str:
    return json.dumps(spec, default=str) if isinstance(spec, dict) else repr(str(spec))


def load_dataset_spec(spec: dict[str, Any] | str, *, base_dir: PathLike | None = None) -> list[Example]:
    """Load examples from a config spec.

    ``spec`` is a dict with ``type`` (a :data:`dphrl.tasks.TASKS` name or ``package.module:attr``),
    usually ``path`` (a file or directory, relative paths resolved against ``base_dir``), optional
    ``limit`` and ``seed`` (shuffle with this seed before applying ``limit``), and the loader's own
    keyword options. A string is a path (type inferred) or ``"<type>:<path>"``. A wrong spec raises
    :class:`DatasetSpecError` (a ``ValueError``) listing the valid options before any file is read; a
    spec that gives no example raises ``ValueError``. The result records the type as ``dataset_type``.
    """
    r = resolve_dataset_spec(spec, base_dir=base_dir)
    assert r is not None  # strict
    examples = r.fn(**r.kwargs)
    skipped = getattr(examples, "skipped", 0)
    reasons = getattr(examples, "skip_reasons", {})
    items = list(examples)
    if not items:
        if skipped:
            why = f"all {skipped} were skipped ({', '.join(f'{k}: {n}' for k, n in sorted(reasons.items()))})"
        elif r.path is not None:
            why = f"{r.path} has no data rows, or the spec's options filter them all out"
        else:
            why = "the generator returned none; check its options"
        raise ValueError(
            f"dataset {_describe_spec(spec)} gave no examples: {why}. Check its path and filters."
        )
    first: dict[str, int] = {}
    for i, ex in enumerate(items):  # the store, the evaluation and the report key examples by id
        if ex.id in first:
            raise ValueError(
                f"dataset {_describe_spec(spec)}: example id {ex.id!r} is used twice (examples "
                f"{first[ex.id] + 1} and {i + 1} in file order); ids must be unique: fix the data or name "
                "another id_field."
            )
        first[ex.id] = i
    if r.seed is not None:
        random.Random(r.seed).shuffle(items)
    return Examples(_take(items, r.limit), skipped=skipped, skip_reasons=reasons, dataset_type=r.kind)
