"""Tasks: one registry entry per dataset ``type`` (how to load it, its reward, its eval hooks).

A dataset type is one :class:`TaskSpec` in :data:`TASKS` (the project's registry idiom,
:class:`dphrl.registry.Registry`): its loader (a function or a lazily imported
``"package.module:function"``), the name of the loader's path keyword (``path``/``directory``, or
None for a generator that reads no file), the reward used when the config's ``reward`` is empty, whether
the type is a cheap seeded generator, and optional evaluation hooks: ``style_fn(response)``
(style shares) and ``answer_fn(response)`` (maj@k, distinct correct answers). The loader of
:mod:`dphrl.data.loaders`, the dry run, ``dphrl eval`` and the in-training evaluation look tasks up here.

Adding a built-in type is one ``register_task(TaskSpec(...))`` below. A task outside the package needs
no registration: ``dataset: {type: my_pkg.mod:my_task}`` imports ``my_task``, which is either

* a :class:`TaskSpec` (loader, path keyword, reward, hooks as above), or
* a plain loader function returning :class:`~dphrl.data.example.Example` records: it becomes a
  TaskSpec without hooks whose path keyword is ``path`` when the function has a ``path`` parameter
  (else the type takes no ``path``); the reward is then the examples' ``task``.

Every loader sets ``Example.task`` to the reward name; ``default_reward`` states the same name up
front (the dry run names it when the data is absent). The other spec keys (``limit``, ``seed``, the
loader's keyword options) are checked against the loader's signature by
:func:`dphrl.data.loaders.resolve_dataset_spec`.

This module imports only the standard library and :mod:`dphrl.registry` (the data layer imports it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dphrl.registry import Registry, import_object

if TYPE_CHECKING:
    from dphrl.data.example import Example

__all__ = ["TASKS", "LabelFn", "TaskSpec", "eval_hooks", "find_task", "get_task", "register_task",
           "task_of_examples"]

#: ``fn(response) -> label or None``: a style or a final answer read from a response.
LabelFn = Callable[[str], "str | None"]
#: ``loader(**options) -> examples`` (a list of :class:`~dphrl.data.example.Example`).
LoaderFn = Callable[..., "Sequence[Example]"]


def _resolve(obj: Any, what: str) -> Any:
    """``obj``, or the object a ``"package.module:attr"`` string names (imported now)."""
    return import_object(obj, what) if isinstance(obj, str) else obj


@dataclass(frozen=True)
class TaskSpec:
    """One dataset type: ``name`` is the ``type`` users write in a dataset spec.

    ``loader`` (or ``"module:function"``, imported on first use) builds the examples from the spec's
    options; ``path_arg`` names its path keyword, which the spec's ``path`` fills (None: the type takes
    no ``path``); ``default_reward`` is the reward its examples name in ``Example.task`` (used when the
    config's ``reward`` is empty); ``seeded``: a cheap generator, not a file: the spec's ``seed`` goes to
    its ``seed`` parameter when it has one (else the examples are shuffled with it, as for files) and a
    preview (the dry run) may cap its ``limit``; ``style_fn``/``answer_fn`` (or ``"module:function"``)
    label responses at evaluation.
    """

    name: str
    loader: LoaderFn | str
    path_arg: str | None = None
    default_reward: str | None = None
    seeded: bool = False
    style_fn: LabelFn | str | None = None
    answer_fn: LabelFn | str | None = None
    description: str = ""

    def load_fn(self) -> LoaderFn:
        """The loader function (imported when given as ``"module:function"``)."""
        fn = _resolve(self.loader, f"loader of dataset type {self.name!r}")
        if not callable(fn):
            raise ValueError(f"loader of dataset type {self.name!r}: {self.loader!r} is not callable")
        return fn

    def hooks(self) -> tuple[LabelFn | None, LabelFn | None]:
        """``(style_fn, answer_fn)`` for evaluation, imported when given as strings (None: none)."""
        return (_resolve(self.style_fn, f"style_fn of dataset type {self.name!r}"),
                _resolve(self.answer_fn, f"answer_fn of dataset type {self.name!r}"))


def _as_task(obj: Any) -> TaskSpec:
    """What ``type: package.module:attr`` imports -> a TaskSpec (a bare loader function is wrapped)."""
    if isinstance(obj, TaskSpec):
        return obj
    if callable(obj):
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError) as e:
            raise ValueError(f"cannot read the signature of loader {obj!r} ({e})") from e
        name = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
        return TaskSpec(name=name, loader=obj, path_arg="path" if "path" in params else None)
    raise ValueError(f"expected a dphrl.tasks.TaskSpec or a loader function, got {type(obj).__name__}")


#: Dataset type name -> :class:`TaskSpec`. No ``config_key``: the key at fault (``dataset.type``,
#: ``eval_data.<name>.type``) is added by the dataset-spec check.
TASKS: Registry[TaskSpec] = Registry("dataset type", adapt=_as_task)


def register_task(task: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    """Register ``task`` under ``task.name`` (``overwrite=True`` to replace an existing one)."""
    return TASKS.register(task.name, task, overwrite=overwrite)


def get_task(name: str) -> TaskSpec:
    """The task of dataset type ``name`` (registered, or ``package.module:attr``); ValueError if none."""
    return TASKS.get(name)


def find_task(name: Any) -> TaskSpec | None:
    """Like :func:`get_task`, but None for an unknown or unimportable type (no error)."""
    if not isinstance(name, str):
        return None
    try:
        return TASKS.get(name)
    except ValueError:
        return None


def task_of_examples(examples: Sequence[Example]) -> TaskSpec | None:
    """The task ``examples`` came from: the ``dataset_type`` that :func:`dphrl.data.loaders.load_dataset_spec`
    records on its result, else (examples built by hand, e.g. ``dphrl.tasks.styles.make_examples``) the
    registered type named like their common ``Example.task``; None when neither is known."""
    kind = getattr(examples, "dataset_type", None)
    if kind is not None:
        return find_task(kind)
    names = {ex.task for ex in examples}
    if len(names) == 1:
        name = names.pop()
        if name in TASKS:  # registered names only: an Example.task of 'module:attr' is a reward
            return TASKS[name]
    return None


def eval_hooks(task: str | TaskSpec | Sequence[Example] | None) -> tuple[LabelFn | None, LabelFn | None]:
    """``(style_fn, answer_fn)`` of a task given by type name, TaskSpec or its examples; (None, None)
    when the task is unknown or has no hooks."""
    if isinstance(task, str):
        spec = find_task(task)
    elif isinstance(task, TaskSpec) or task is None:
        spec = task
    else:
        spec = task_of_examples(task)
    return spec.hooks() if spec is not None else (None, None)


# --------------------------------------------------------------------------------------------------
# Built-in dataset types (loaders imported on first use: dphrl.data.loaders imports this module)

_L = "dphrl.data.loaders:"
for _task in (
    TaskSpec("gsm8k", _L + "load_gsm8k", "path", "math", description="GSM8K jsonl"),
    TaskSpec("math", _L + "load_math", "path", "math", description="MATH / MATH-500 jsonl"),
    TaskSpec("spider", _L + "load_spider", "directory", "sql", description="Spider directory"),
    TaskSpec("bird", _L + "load_bird", "directory", "bird", description="BIRD directory"),
    # generic rows: the spec's ``task`` option names the reward (default 'math')
    TaskSpec("jsonl", _L + "load_jsonl", "path", "math", description="generic jsonl rows"),
    TaskSpec("parquet", _L + "load_parquet", "path", "math", description="generic parquet rows"),
    TaskSpec("hf", _L + "load_hf", "path", "math", description="Hugging Face datasets, local files"),
    TaskSpec("synthetic_arith", "dphrl.data.synthetic:make_arithmetic", None, "math", seeded=True,
             description="generated arithmetic"),
    TaskSpec("synthetic_sql", "dphrl.data.synthetic:make_sql_tasks", "directory", "sql", seeded=True,
             description="generated text-to-SQL over a shop database"),
    TaskSpec("styles", "dphrl.tasks.styles:make_examples", None, "styles", seeded=True,
             style_fn="dphrl.tasks.styles:style_of", answer_fn="dphrl.tasks.styles:final_answer",
             description="the demo's multi-style arithmetic"),
):
    register_task(_task)
del _task
