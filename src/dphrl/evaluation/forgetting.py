"""Forgetting without labels: the forward KL from the base model on held-out prompts (RL's Razor).

Shenfeld et al. ("RL's Razor", arXiv 2509.04259) find that how much a fine-tuned model forgets of
what its base could do tracks the forward KL(pi_0 || pi_theta) measured on the *new* task's
distribution, and is read off without any labels: sample the base pi_0 once on held-out prompts of
another domain, store prompts, responses and log pi_0 per token, and for any trained pi_theta report

    F(theta) = E_{y ~ pi_0}[ sum_t (log pi_0(y_t | x, y_<t) - log pi_theta(y_t | x, y_<t)) ] / E[|y|]

(per token: the token-weighted mean over every stored token). ``kl_per_seq``, the mean over sequences
of the summed log-ratio, is the unbiased Monte-Carlo estimate of the sequence-level forward KL
(averaged over the prompts); ``kl_per_token`` is its ratio to the mean response length (consistent,
with a delta-method standard error). Responses cut at ``max_new_tokens`` count as they are: the KL
is then that of the two models' distributions over responses truncated at that length, exactly.

Why a dedicated set and not the reference store: :func:`dphrl.reference.presample` keeps only the
*correct* responses of D_pef prompts (a reward-filtered, biased sample, none for D_exp prompts); the
forward KL needs every response drawn from pi_0, on any prompts, with no reward at all.

What is stored is what was sampled: responses come from the ``hf`` engine at ``temperature`` with
top-p 1 and top-k off (the exact softmax(logits / T)); log pi_0 is then recomputed by the same
batched forward :func:`forgetting` runs on pi_theta (:func:`dphrl.prefix.batch_logprobs`, same
micro-batching), so the base model scored against its own set gives 0 (bitwise on one machine) and
every numerical difference between the generation kernels and the packed forward stays out of F.
The engine's own log-probs are compared with the recomputed ones at sampling time and the set is
refused when they disagree beyond :func:`dphrl.reference.store_tolerance` (the samples would not be
from the distribution stored). Layout of a set directory (written to a temp dir and swapped into
place, :func:`dphrl.fsutil.replace_dir`)::

    manifest.json     format and version, model name, weights fingerprint, tokenizer hash, sampling
                      (n, temperature, top_p 1, top_k 0, max_new_tokens), seed, dtype of the forward,
                      dataset hash, counts (prompts, sequences, tokens, finished), the engine-vs-forward
                      log-prob check, sha256 of samples.parquet
    samples.parquet   prompt_id (str), prompt_ids (list<int32>), response_ids (list<int32>, EOS last
                      when finished), logprobs (list<float32>, log pi_0 per response token at T),
                      finished (bool)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dphrl.data.example import Example
from dphrl.prefix import (
    sequence_logprobs,  # the one forward: sampling-time log pi_0, scoring-time log pi_theta
)
from dphrl.reference import LOGPROB_FLOOR, LOGPROB_SLACK, StoreCorruptError, StoreMismatchError

__all__ = ["FORMAT", "FORMAT_VERSION", "ForgettingSet", "forgetting", "load_forgetting_set",
           "sample_forgetting_set"]

FORMAT = "dphrl-forgetting-set"
FORMAT_VERSION = 1
SAMPLES_FILE = "samples.parquet"
MANIFEST_FILE = "manifest.json"

_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),
        ("finished", pa.bool_()),
    ]
)


@dataclass
class ForgettingSet:
    """Responses of the base model pi_0 with their per-token log pi_0 (at ``temperature``), in memory.

    Built by :func:`load_forgetting_set` (checked against its files) or directly (tests); the
    constructor checks that the lists line up, one finite log-prob <= 0 per response token.
    """

    manifest: dict[str, Any]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    path: Path | None = None
    prompt_keys: list[str] = field(default_factory=list)  # Example.id of each sequence's prompt

    def __post_init__(self) -> None:
        where = f"forgetting set {self.path}" if self.path is not None else "forgetting set"
        if not (len(self.prompt_ids) == len(self.response_ids) == len(self.logprobs)):
            raise ValueError(f"{where}: {len(self.prompt_ids)} prompts, {len(self.response_ids)} responses "
                             f"and {len(self.logprobs)} log-prob rows (must be equal)")
        if not self.response_ids:
            raise ValueError(f"{where}: holds no sequences")
        for i, (p, r, lp) in enumerate(zip(self.prompt_ids, self.response_ids, self.logprobs)):
            if not p or not r or len(lp) != len(r):
                raise ValueError(f"{where}: sequence {i} has {len(p)} prompt tokens, {len(r)} response "
                                 f"tokens and {len(lp)} log-probs (needs >= 1 of each and one log-prob per "
                                 "response token)")
        flat = np.concatenate([np.asarray(lp, dtype=np.float64) for lp in self.logprobs])  # (tokens,)
        ok = np.isfinite(flat) & (flat <= LOGPROB_SLACK) & (flat >= LOGPROB_FLOOR)
        if not ok.all():
            raise ValueError(f"{where}: impossible log-probs {flat[~ok][:3].tolist()} (must be finite, in "
                             f"[{LOGPROB_FLOOR:g}, 0])")
        temp = self.temperature
        if not (math.isfinite(temp) and temp > 0):
            raise ValueError(f"{where}: manifest sampling.temperature {temp!r} (must be a positive number)")
        top_p = self.manifest.get("sampling", {}).get("top_p", 1.0)
        if float(top_p) != 1.0:
            raise ValueError(f"{where}: manifest sampling.top_p {top_p!r}; the forward KL needs samples from "
                             "the full softmax (top_p 1)")

    @property
    def temperature(self) -> float:
        """The temperature sampled at; pi_theta is scored at the same one."""
        return float(self.manifest.get("sampling", {}).get("temperature", float("nan")))

    @property
    def tokenizer_hash(self) -> str | None:
        return self.manifest.get("tokenizer_hash")

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    def __len__(self) -> int:
        return len(self.response_ids)


# --------------------------------------------------------------------------------------------------
# sampling the base model once


def sample_forgetting_set(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    out_dir: str | Path,
    *,
    n: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    micro_batch_size: int = 16,
    model_name: str = "",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sample the base model ``n`` times per held-out prompt and write a forgetting set to ``out_dir``.

    ``model`` is the base pi_0 (unwrapped Hugging Face model: its weights fingerprint identifies it).
    Sampling is ancestral from softmax(logits / ``temperature``), top-p 1, top-k off, with the ``hf``
    engine (``batch_size`` sequences per ``generate``, seeded with ``seed``); log pi_0 is recomputed
    with :func:`sequence_logprobs` (``micro_batch_size``) and checked against the engine's. No reward is
    computed: the examples' prompts alone are used. Refuses an existing ``out_dir`` unless
    ``overwrite``. Returns the manifest (also written to ``manifest.json``).
    """
    from dphrl.batching import pad_token_id
    from dphrl.data.chat import encode_prompt
    from dphrl.engines import build_engine
    from dphrl.fsutil import replace_dir, sha256_file
    from dphrl.models import tokenizer_hash, weights_fingerprint
    from dphrl.reference import dataset_hash, store_tolerance

    out_dir = Path(out_dir)
    if not examples:
        raise ValueError("sample_forgetting_set: no examples")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample_forgetting_set: n ({n}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"sample_forgetting_set: temperature must be > 0 (sampling, not greedy), got "
                         f"{temperature}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"forgetting set {out_dir} already exists; pass overwrite=True to replace it "
                              "(every model compared on a set must be scored on the same samples)")
    t0 = time.time()
    fingerprint = weights_fingerprint(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    pad_id = pad_token_id(tokenizer)
    engine = build_engine("hf", model, tokenizer, batch_size=batch_size)
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    gens = [g for gs in engine.generate(prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=1.0, seed=seed) for g in gs]
    keys = [ex.id for ex in examples for _ in range(n)]
    p_ids, r_ids = [g.prompt_ids for g in gens], [g.response_ids for g in gens]
    lps = sequence_logprobs(model, p_ids, r_ids, pad_id, temperature, micro_batch_size=micro_batch_size)
    engine_lps = [np.asarray(g.logprobs, dtype=np.float64) for g in gens]
    diffs = np.abs(np.concatenate([a - b for a, b in zip(engine_lps, lps)]))  # (tokens,)
    mean_diff, max_diff = float(diffs.mean()), float(diffs.max())
    tol = store_tolerance(dtype, dtype)
    if not mean_diff <= tol:  # also refuses NaN
        raise StoreMismatchError(
            f"sample_forgetting_set: the engine's sampling log-probs differ from the model's own forward by "
            f"{mean_diff:.3g} per token on average (max {max_diff:.3g} > tolerance {tol:g}, dtype {dtype}): "
            "the responses were not drawn from the distribution that would be stored")
    tokens = int(sum(len(r) for r in r_ids))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_fingerprint": fingerprint,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "sampling": {"n": n, "temperature": temperature, "top_p": 1.0, "top_k": 0,
                     "max_new_tokens": max_new_tokens},
        "seed": seed,
        "dtype": dtype,
        "micro_batch_size": micro_batch_size,
        "dataset_hash": dataset_hash(examples),
        "counts": {"prompts": len(examples), "sequences": len(gens), "tokens": tokens,
                   "finished": int(sum(g.finished for g in gens))},
        "logprob_check": {"mean_abs_diff": mean_diff, "max_abs_diff": max_diff, "tolerance": tol},
        "logprobs_source": "forward",
        "seconds": round(time.time() - t0, 3),
    }
    rows = [{"prompt_id": k, "prompt_ids": list(p), "response_ids": list(r), "logprobs": list(lp),
             "finished": g.finished} for k, p, r, lp, g in zip(keys, p_ids, r_ids, lps, gens)]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), tmp / SAMPLES_FILE)
    manifest["files"] = {SAMPLES_FILE: sha256_file(tmp / SAMPLES_FILE)}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    replace_dir(tmp, out_dir)
    return manifest


# --------------------------------------------------------------------------------------------------
# loading, checked


def _hint(path: Path) -> str:
    return ("Re-create it with dphrl.evaluation.forgetting.sample_forgetting_set(..., "
            f"out_dir={str(path)!r}, overwrite=True).")


def load_forgetting_set(path: str | Path) -> ForgettingSet:
    """Read and check a forgetting set written by :func:`sample_forgetting_set`.

    Refused, with :class:`dphrl.reference.StoreCorruptError` naming the file: a missing or unreadable
    manifest or samples file, another format or version, a checksum that differs from the manifest's,
    counts (sequences, tokens, prompts x n) that differ from the manifest's, a response longer than
    ``max_new_tokens``, a log-prob row of another length than its response, non-finite or positive
    log-probs, a temperature <= 0 or top-p < 1.
    """
    from dphrl.fsutil import recover_dir, sha256_file

    path = Path(path)
    recover_dir(path)
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise StoreCorruptError(f"forgetting set {mf}: missing (not a forgetting set directory). "
                                f"{_hint(path)}")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"forgetting set {mf}: not valid JSON ({e}). {_hint(path)}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreCorruptError(f"forgetting set {mf}: field 'format' is {got!r}, not {FORMAT!r} (a "
                                f"reference store or another file?). {_hint(path)}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreCorruptError(f"forgetting set {mf}: field 'format_version' is "
                                f"{manifest.get('format_version')!r}, this dphrl reads {FORMAT_VERSION}. "
                                f"{_hint(path)}")
    f = path / SAMPLES_FILE
    if not f.is_file():
        raise StoreCorruptError(f"forgetting set {f}: missing. {_hint(path)}")
    want, got = (manifest.get("files") or {}).get(SAMPLES_FILE), sha256_file(f)
    if want != got:
        raise StoreCorruptError(f"forgetting set {f}: checksum {got[:12]}... differs from the manifest's "
                                f"{str(want)[:12]}... (truncated or altered). {_hint(path)}")
    try:
        table = pq.read_table(f)
    except (pa.ArrowException, OSError) as e:
        raise StoreCorruptError(f"forgetting set {f}: unreadable parquet ({e}). {_hint(path)}") from e
    missing = [c for c in _SCHEMA.names if c not in table.column_names]
    if missing:
        raise StoreCorruptError(f"forgetting set {f}: lacks columns {missing}. {_hint(path)}")
    cols = {c: table.column(c).to_pylist() for c in _SCHEMA.names}
    counts, sampling = manifest.get("counts") or {}, manifest.get("sampling") or {}
    n_seq, n_tok = len(cols["response_ids"]), sum(len(r or []) for r in cols["response_ids"])
    problems = []
    if counts.get("sequences") != n_seq:
        problems.append(f"{n_seq} sequences, the manifest says {counts.get('sequences')}")
    if counts.get("tokens") != n_tok:
        problems.append(f"{n_tok} response tokens, the manifest says {counts.get('tokens')}")
    n_prompts, n_per = counts.get("prompts"), sampling.get("n")
    if isinstance(n_prompts, int) and isinstance(n_per, int) and n_prompts * n_per != n_seq:
        problems.append(f"{n_seq} sequences for {counts['prompts']} prompts x n={sampling['n']}")
    longest = max((len(r or []) for r in cols["response_ids"]), default=0)
    if isinstance(sampling.get("max_new_tokens"), int) and longest > sampling["max_new_tokens"]:
        problems.append(f"a response of {longest} tokens > max_new_tokens {sampling['max_new_tokens']}")
    if problems:
        raise StoreCorruptError(f"forgetting set {f}: " + "; ".join(problems) + f". {_hint(path)}")
    try:
        return ForgettingSet(manifest=manifest, prompt_ids=cols["prompt_ids"],
                             response_ids=cols["response_ids"], logprobs=cols["logprobs"], path=path,
                             prompt_keys=cols["prompt_id"])
    except (ValueError, TypeError) as e:
        raise StoreCorruptError(f"{e} (in {f}). {_hint(path)}") from e


# --------------------------------------------------------------------------------------------------
# the measure


def forgetting(
    model: torch.nn.Module,
    tokenizer: Any,
    fset: ForgettingSet,
    *,
    micro_batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Forward KL(pi_0 || pi_theta) of ``model`` (pi_theta) on the forgetting set (samples of pi_0).

    Scores every stored response with :func:`sequence_logprobs` at the set's temperature and returns

    * ``forgetting/kl_per_token``: sum over all stored tokens of (log pi_0 - log pi_theta) / tokens;
    * ``forgetting/stderr_per_token``: its delta-method standard error over sequences;
    * ``forgetting/kl_per_seq``: the mean over sequences of the summed log-ratio (unbiased estimate of
      the sequence-level forward KL averaged over the prompts);
    * ``forgetting/stderr_per_seq``: std over sequences / sqrt(sequences);
    * ``forgetting/sequences``, ``forgetting/tokens``, ``forgetting/prompts``.

    Standard errors treat sequences as independent draws (NaN with a single sequence). ``micro_batch_size``
    defaults to the one the set was made with (the base model then scores its own set as exactly 0).
    Refuses (:class:`dphrl.reference.StoreMismatchError`) a tokenizer whose hash differs from the set's.
    Call it under the autocast / dtype of the model being compared; compare models in one dtype.
    """
    from dphrl.batching import pad_token_id
    from dphrl.models import tokenizer_hash

    have = tokenizer_hash(tokenizer)
    if fset.tokenizer_hash != have:
        raise StoreMismatchError(
            f"forgetting set {fset.path}: field 'tokenizer_hash' is {fset.tokenizer_hash}, the tokenizer "
            f"given has {have}: the stored token ids mean other text for this model. Score models that share "
            "the base's tokenizer, or sample a set with this one.")
    mbs = int(fset.manifest.get("micro_batch_size") or 16) if micro_batch_size is None else micro_batch_size
    theta = sequence_logprobs(model, fset.prompt_ids, fset.response_ids, pad_token_id(tokenizer),
                              fset.temperature, micro_batch_size=mbs, device=device)
    d = np.array([np.sum(np.asarray(lp0, dtype=np.float64) - np.asarray(lpt, dtype=np.float64))
                  for lp0, lpt in zip(fset.logprobs, theta)])  # (N,) summed log-ratio per sequence
    lens = np.array([len(r) for r in fset.response_ids], dtype=np.float64)  # (N,)
    N, tokens = len(d), float(lens.sum())
    per_tok = float(d.sum() / tokens)
    if N > 1:
        resid = d - per_tok * lens  # (N,) ratio estimator's linearization
        se_tok = float(math.sqrt((resid ** 2).sum() / (N * (N - 1))) / lens.mean())
        se_seq = float(d.std(ddof=1) / math.sqrt(N))
    else:
        se_tok = se_seq = float("nan")
    prompts = len(set(map(tuple, fset.prompt_ids)))
    return {
        "forgetting/kl_per_token": per_tok,
        "forgetting/stderr_per_token": se_tok,
        "forgetting/kl_per_seq": float(d.mean()),
        "forgetting/stderr_per_seq": se_seq,
        "forgetting/sequences": float(N),
        "forgetting/tokens": tokens,
        "forgetting/prompts": float(prompts),
    }
