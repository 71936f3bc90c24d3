"""Pre-sampling and the reference store: the D_pef / D_exp split and the stored pi_ref samples.

``presample`` samples n responses per training prompt from the base model once, scores them, splits
the prompts by pass rate, and stores the correct responses of D_pef prompts with their token ids and
per-token log pi_ref (fp32, the exact distribution sampled from: same temperature, renormalized
after top-p). Training then needs no reference model. Layout of a store directory::

    manifest.json      store version, model name and weights fingerprint, tokenizer hash, sampling
                       parameters (n, temperature, top_p, top_k, max_new_tokens), dtype of the forward
                       that produced the log-probs, seed, dataset hash, counts, sha256 of each file
    prompts.parquet    prompt_id, pass_rate, n_correct, n_sampled, split ("pef" | "exp")
    samples.parquet    prompt_id, prompt_ids, response_ids, ref_logprobs, finished, text

The store is checked, not trusted: :class:`ReferenceStore` verifies each file's checksum, that every
stored log-prob is finite, in [-1e5, 0], with one per response token, and :meth:`check_compatible` that the
store was made from the same weights (fingerprint, not path), tokenizer, temperature, top-p and data;
the trainer then re-scores a sample of stored tokens with its own forward (``verify_store``).
A store is written to a temp directory and swapped into place (:func:`dphrl.fsutil.replace_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dphrl.data.chat import encode_prompt
from dphrl.data.example import Example
from dphrl.engines.base import Engine
from dphrl.errors import PathNotFoundError, UserError, UserValueError
from dphrl.progress import progress_bar
from dphrl.rewards.registry import CORRECT_THRESHOLD, RewardFailureError, RewardFn, score_batch

STORE_VERSION = 2
LOGPROB_SLACK = 1e-4  # stored log-probs may exceed 0 by float rounding only
LOGPROB_FLOOR = -1e5  # below this a stored log-prob is corruption (fp32 logits/temperature never get there)


class StoreMismatchError(UserError, ValueError):
    """The reference store was made with another model, tokenizer or sampling setting."""


class StoreCorruptError(UserError, ValueError):
    """A store file is missing, truncated, altered or holds impossible values; the message names the
    file and how to rebuild it."""


def dataset_hash(examples: list[Example]) -> str:
    """Stable hash of the training prompts and answers (detects a store made on other data)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.prompt, ex.answer, ex.gold_sql], sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass
class RefSample:
    prompt_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    ref_logprobs: list[float]
    #: with a top-k store: per response position, the reference's K most likely ids (by probability)
    #: and the log-probs of those K buckets + the tail bucket (-inf when the top-k cover the vocabulary)
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def presample(
    engine: Engine,
    tokenizer: Any,
    examples: list[Example],
    reward_fn: RewardFn,
    out_dir: str | Path,
    *,
    model_name: str,
    tokenizer_hash: str,
    n: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    threshold: float = 1.0,
    keep_per_prompt: int = 0,
    seed: int = 0,
    prompts_per_call: int = 16,
    reward_timeout_s: float = 10.0,
    reward_workers: int = -1,
    progress: bool = True,
    extra_manifest: dict | None = None,
    logprob_model: Any = None,
    micro_batch_size: int = 16,
    weights_fingerprint: str | None = None,
    dtype: str | None = None,
    topk: int = 0,
    max_failure_frac: float = 0.2,
) -> dict:
    """Sample, score, split and store. Returns the manifest (also written to ``manifest.json``).

    More than ``max_failure_frac`` of the rewards failing or timing out raises
    :class:`~dphrl.rewards.registry.RewardFailureError` before anything is written (a store whose
    split rests on failed rewards would rehearse the wrong prompts).

    ``logprob_model``: when given (engine vllm), the stored log pi_ref are recomputed by this model
    (one no-grad forward at ``temperature``, the computation the trainer uses for log pi_theta) instead
    of taken from the engine, whose kernels do not match the training forward. Needs ``top_p == 1``.
    ``weights_fingerprint`` (:func:`dphrl.models.weights_fingerprint` of the sampled model) and
    ``dtype`` (of the forward that produced the log-probs) default to those of ``logprob_model`` or of
    the engine's ``model`` attribute (the HF engine's). ``topk > 0`` also stores, per response position
    of every stored sample, the reference's top-k ids and bucket log-probs (top-k + tail, from the same
    model's forward at ``temperature``) for the full-distribution rehearsal forms; needs top_p 1.
    """
    src_model = logprob_model if logprob_model is not None else getattr(engine, "model", None)
    if weights_fingerprint is None:
        if src_model is None:
            raise ValueError("presample: pass weights_fingerprint=dphrl.models.weights_fingerprint(model) "
                             "(the engine does not expose its model)")
        from dphrl.models import weights_fingerprint as _fingerprint

        weights_fingerprint = _fingerprint(src_model)
    if dtype is None:
        dtype = (
            str(next(src_model.parameters()).dtype).removeprefix("torch.")
            if src_model is not None
            else "unknown"
        )
    out_dir = Path(out_dir)
    if topk and top_p < 1.0:
        raise UserValueError(
            "presample: rehearsal_topk > 0 needs top_p 1.0 (the stored top-k are of the full softmax)"
        )
    if logprob_model is not None and top_p < 1.0:
        raise UserValueError(
            "presample: recomputing log pi_ref (engine vllm) needs top_p 1.0; use engine hf for top_p < 1"
        )
    t0 = time.time()
    prompt_rows: list[dict] = []
    sample_rows: list[dict] = []
    failures = timeouts = 0
    bar = progress_bar(total=len(examples), desc="presample", unit="prompt", disable=not progress)
    for start in range(0, len(examples), prompts_per_call):
        chunk = examples[start : start + prompts_per_call]
        ids = [encode_prompt(tokenizer, ex.prompt) for ex in chunk]
        gens = engine.generate(
            ids, n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + start
        )
        flat = [g for gs in gens for g in gs]
        scored = score_batch(
            reward_fn, [g.text for g in flat], [ex for ex in chunk for _ in range(n)],
            timeout_s=reward_timeout_s, num_workers=reward_workers,
        )
        failures += scored.failures
        timeouts += scored.timeouts
        for i, ex in enumerate(chunk):
            rewards = scored.scores[i * n : (i + 1) * n]
            correct = [g for g, r in zip(gens[i], rewards) if r >= CORRECT_THRESHOLD]
            rate = len(correct) / n
            split = "pef" if rate >= threshold else "exp"
            prompt_rows.append(
                {
                    "prompt_id": ex.id,
                    "pass_rate": rate,
                    "n_correct": len(correct),
                    "n_sampled": n,
                    "split": split,
                }
            )
            if split == "pef":
                keep = correct[:keep_per_prompt] if keep_per_prompt > 0 else correct
                for g in keep:
                    sample_rows.append(
                        {
                            "prompt_id": ex.id,
                            "prompt_ids": g.prompt_ids,
                            "response_ids": g.response_ids,
                            "ref_logprobs": g.logprobs,
                            "finished": g.finished,
                            "text": g.text,
                        }
                    )
        bar.update(len(chunk))
        bar.set_postfix(pef=sum(r["split"] == "pef" for r in prompt_rows))
    bar.close()
    scored_n = len(examples) * n
    if scored_n and (failures + timeouts) / scored_n > max_failure_frac:
        raise RewardFailureError(
            f"presample: {failures} of {scored_n} reward evaluations failed and {timeouts} timed out (> "
            f"max_reward_failure_frac={max_failure_frac}); nothing was written to {out_dir}. Check the "
            f"reward {getattr(reward_fn, '__name__', reward_fn)!r} on a few samples (`dphrl eval` shows "
            "them)."
        )
    if logprob_model is not None and sample_rows:  # one no-grad forward, the trainer's own computation
        from dphrl.batching import pad_token_id
        from dphrl.prefix import sequence_logprobs

        lps = sequence_logprobs(
            logprob_model,
            [r["prompt_ids"] for r in sample_rows],
            [r["response_ids"] for r in sample_rows],
            pad_token_id(tokenizer),
            temperature,
            micro_batch_size=micro_batch_size,
        )
        for r, lp in zip(sample_rows, lps):
            r["ref_logprobs"] = lp
    if topk and sample_rows:
        _add_topk(src_model, tokenizer, sample_rows, topk, temperature, micro_batch_size)
    n_pef = sum(r["split"] == "pef" for r in prompt_rows)
    manifest = {
        "store_version": STORE_VERSION,
        "model": model_name,
        "model_fingerprint": weights_fingerprint,
        "tokenizer_hash": tokenizer_hash,
        "sampling": {
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": 0,
            "max_new_tokens": max_new_tokens,
        },
        "dtype": dtype,
        "rehearsal_topk": int(topk),
        "seed": seed,
        "threshold": threshold,
        "keep_per_prompt": keep_per_prompt,
        "dataset_hash": dataset_hash(examples),
        "counts": {
            "prompts": len(prompt_rows),
            "d_pef": n_pef,
            "d_exp": len(prompt_rows) - n_pef,
            "stored_samples": len(sample_rows),
            "reward_failures": failures,
            "reward_timeouts": timeouts,
        },
        "mean_pass_rate": sum(r["pass_rate"] for r in prompt_rows) / max(1, len(prompt_rows)),
        "seconds": round(time.time() - t0, 2),
        "ref_logprobs_source": "recomputed" if logprob_model is not None else "engine",
        **(extra_manifest or {}),
    }
    _write_store(out_dir, manifest, prompt_rows, sample_rows)
    return manifest


def _add_topk(model: Any, tokenizer: Any, rows: list[dict], k: int, temperature: float, micro: int) -> None:
    """Set each row's ``topk_ids`` / ``topk_logprobs`` from one no-grad forward per micro-batch."""
    import torch

    from dphrl.batching import pack, pad_token_id, response_logits
    from dphrl.divergences import reference_topk

    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), micro):
            chunk = rows[i : i + micro]
            batch = pack(
                [r["prompt_ids"] for r in chunk], [r["response_ids"] for r in chunk], pad_token_id(tokenizer)
            )
            logits = response_logits(model, batch.to(dev), temperature)  # (B, T, V)
            ids, ref_b = reference_topk(logits, k)  # (B, T, K), (B, T, K+1)
            for r, row_ids, row_b in zip(chunk, ids.cpu(), ref_b.float().cpu()):
                n = len(r["response_ids"])
                r["topk_ids"] = row_ids[:n].tolist()
                r["topk_logprobs"] = row_b[:n].tolist()


_TOPK_FIELDS = [
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
]

_SAMPLE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("ref_logprobs", pa.list_(pa.float32())),
        ("finished", pa.bool_()),
        ("text", pa.string()),
    ]
)
_PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("pass_rate", pa.float64()),
        ("n_correct", pa.int32()),
        ("n_sampled", pa.int32()),
        ("split", pa.string()),
    ]
)


def _write_store(out_dir: Path, manifest: dict, prompt_rows: list[dict], sample_rows: list[dict]) -> None:
    """Write everything to a temp dir (with each file's sha256 in the manifest), then swap it into place."""
    from dphrl.fsutil import replace_dir, sha256_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pq.write_table(pa.Table.from_pylist(prompt_rows, schema=_PROMPT_SCHEMA), tmp / "prompts.parquet")
    schema = _SAMPLE_SCHEMA
    if manifest.get("rehearsal_topk"):
        for name, typ in _TOPK_FIELDS:
            schema = schema.append(pa.field(name, typ))
    pq.write_table(pa.Table.from_pylist(sample_rows, schema=schema), tmp / "samples.parquet")
    manifest["files"] = {name: sha256_file(tmp / name) for name in STORE_FILES}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    replace_dir(tmp, out_dir)


STORE_FILES = ("prompts.parquet", "samples.parquet")


def _rebuild_hint(path: Path) -> str:
    return (f"Rebuild the store with `dphrl presample --config <your config>` (it writes to the config's "
            f"reference_store, here {path}).")


class ReferenceStore:
    """A reference store on disk: the split and the stored pi_ref samples of D_pef prompts.

    Loading verifies the store (see the module docstring) and raises :class:`StoreCorruptError`
    naming the file and how to rebuild it; ``max_prompt_tokens`` drops stored samples whose prompt is
    longer (the rule rollout prompts follow), counted in ``dropped_long_prompts``.
    """

    def __init__(self, path: str | Path, *, max_prompt_tokens: int | None = None):
        from dphrl.fsutil import recover_dir

        self.path = Path(path)
        recover_dir(self.path)  # an interrupted swap left the old store aside: put it back
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise PathNotFoundError(
                f"reference store {self.path}: no manifest.json. Create it with `dphrl presample --config "
                "<your config>` (it writes to the config's reference_store directory)."
            )
        try:
            self.manifest: dict = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreCorruptError(
                f"reference store {mf}: not valid JSON ({e}). {_rebuild_hint(self.path)}"
            ) from e
        if self.manifest.get("store_version") != STORE_VERSION:
            raise StoreMismatchError(
                f"reference store {self.path}: field 'store_version' is "
                f"{self.manifest.get('store_version')!r}, this dphrl reads version {STORE_VERSION} (which "
                "records a weights fingerprint and file checksums). "
                + _rebuild_hint(self.path)
            )
        self.topk = int(self.manifest.get("rehearsal_topk") or 0)
        prompts = self._read("prompts.parquet")
        self.pass_rate = {r["prompt_id"]: r["pass_rate"] for r in prompts}
        self.pef_ids = [r["prompt_id"] for r in prompts if r["split"] == "pef"]
        self.exp_ids = [r["prompt_id"] for r in prompts if r["split"] == "exp"]
        self.samples: dict[str, list[RefSample]] = {}
        self.dropped_long_prompts = 0
        table = self._read_table("samples.parquet")
        self._check_samples(table)
        for r in table.to_pylist():
            if max_prompt_tokens is not None and len(r["prompt_ids"]) > max_prompt_tokens:
                self.dropped_long_prompts += 1
                continue
            self.samples.setdefault(r["prompt_id"], []).append(
                RefSample(r["prompt_id"], r["prompt_ids"], r["response_ids"], r["ref_logprobs"],
                          r.get("topk_ids"), r.get("topk_logprobs"))
            )
        # D_pef prompts with at least one stored sample are the ones that can be rehearsed
        self.pef_ids = [p for p in self.pef_ids if self.samples.get(p)]

    def _check_samples(self, t: pa.Table) -> None:
        """Vectorized plausibility checks of samples.parquet: one finite log-prob in [LOGPROB_FLOOR, 0] per
        response token; with top-k, K ids and K + 1 bucket log-probs per token (the tail may be -inf)."""
        import numpy as np
        import pyarrow.compute as pc

        where = f"reference store {self.path / 'samples.parquet'}"

        def refuse(rows: np.ndarray, what: str) -> None:
            raise StoreCorruptError(f"{where}: row {int(rows[0])} {what}. " + _rebuild_hint(self.path))

        n_resp = pc.list_value_length(t["response_ids"]).to_numpy(zero_copy_only=False)  # (N,)
        n_lp = pc.list_value_length(t["ref_logprobs"]).fill_null(-1).to_numpy(zero_copy_only=False)  # (N,)
        bad = np.flatnonzero((n_resp < 1) | (n_lp != n_resp))
        if bad.size:
            refuse(bad, f"has {n_lp[bad[0]]} log-probs for {n_resp[bad[0]]} response tokens")
        lp = pc.list_flatten(t["ref_logprobs"]).to_numpy(zero_copy_only=False).astype(np.float64)  # (sum T,)
        ok = np.isfinite(lp) & (lp >= LOGPROB_FLOOR) & (lp <= LOGPROB_SLACK)
        if not ok.all():
            row = np.searchsorted(np.cumsum(n_resp), np.flatnonzero(~ok)[0], side="right")
            refuse(np.array([row]), f"holds impossible log-probs {lp[~ok][:3].tolist()} (must be finite, in "
                                    f"[{LOGPROB_FLOOR:g}, 0])")
        if not self.topk:
            return
        if "topk_ids" not in t.column_names or "topk_logprobs" not in t.column_names:
            refuse(np.array([0]), "lacks the top-k columns the manifest announces")
        n_ids = pc.list_value_length(t["topk_ids"]).fill_null(-1).to_numpy(zero_copy_only=False)
        n_b = pc.list_value_length(t["topk_logprobs"]).fill_null(-1).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero((n_ids != n_resp) | (n_b != n_resp))
        if bad.size:
            refuse(bad, "has top-k columns of another length than its response")
        # (sum T,)
        k_ids = pc.list_value_length(pc.list_flatten(t["topk_ids"])).to_numpy(zero_copy_only=False)
        buckets = pc.list_flatten(t["topk_logprobs"])
        k_b = pc.list_value_length(buckets).to_numpy(zero_copy_only=False)  # (sum T,)
        if not ((k_ids >= 1) & (k_ids <= self.topk) & (k_b == k_ids + 1)).all():
            refuse(
                np.array([0]), f"has malformed top-k columns (want <= {self.topk} ids and one more log-prob)"
            )
        vals = pc.list_flatten(buckets).to_numpy(zero_copy_only=False).astype(np.float64)  # (sum T (K+1),)
        is_tail = np.zeros(vals.size, dtype=bool)
        is_tail[np.cumsum(k_b) - 1] = True
        ok = (np.isfinite(vals) | (is_tail & (vals == -np.inf))) & (vals <= LOGPROB_SLACK)
        ok &= (vals >= LOGPROB_FLOOR) | (is_tail & (vals == -np.inf))
        if not ok.all():
            refuse(
                np.array([0]),
                "holds impossible top-k log-probs (must be finite and <= 0; only the tail may be -inf)",
            )

    def _read(self, name: str) -> list[dict]:
        return self._read_table(name).to_pylist()

    def _read_table(self, name: str) -> pa.Table:
        """One parquet file, checked against the manifest's sha256 (missing, truncated, altered: refused)."""
        from dphrl.fsutil import sha256_file

        f = self.path / name
        if not f.is_file():
            raise StoreCorruptError(f"reference store {f}: missing. " + _rebuild_hint(self.path))
        want = (self.manifest.get("files") or {}).get(name)
        got = sha256_file(f)
        if want != got:
            raise StoreCorruptError(
                f"reference store {f}: checksum {got[:12]}... differs from the manifest's "
                f"{str(want)[:12]}... (truncated or altered). " + _rebuild_hint(self.path)
            )
        try:
            return pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise StoreCorruptError(
                f"reference store {f}: unreadable parquet ({e}). {_rebuild_hint(self.path)}"
            ) from e

    def check_compatible(
        self,
        *,
        model_fingerprint: str,
        tokenizer_hash: str,
        temperature: float,
        top_p: float = 1.0,
        examples: list[Example] | None = None,
    ) -> None:
        """Refuse a store made from other weights, tokenizer, temperature, top-p or data,
        naming each field."""
        m = self.manifest
        sampling = m.get("sampling", {})
        problems = []
        if m.get("model_fingerprint") != model_fingerprint:
            problems.append(
                f"field 'model_fingerprint': the store was sampled from other weights "
                f"({m.get('model_fingerprint')} from {m.get('model')!r}; this model's is {model_fingerprint})"
            )
        if m.get("tokenizer_hash") != tokenizer_hash:
            problems.append(
                f"field 'tokenizer_hash': {m.get('tokenizer_hash')} != the model's {tokenizer_hash}"
            )
        if abs(float(sampling.get("temperature", float("nan"))) - temperature) > 1e-9:
            problems.append(
                f"field 'sampling.temperature': {sampling.get('temperature')} != config temperature "
                f"{temperature}"
            )
        if abs(float(sampling.get("top_p", float("nan"))) - top_p) > 1e-9:
            problems.append(f"field 'sampling.top_p': {sampling.get('top_p')} != config top_p {top_p}")
        if examples is not None and m.get("dataset_hash") != dataset_hash(examples):
            problems.append(
                "field 'dataset_hash': differs (the training prompts are not the ones that were pre-sampled)"
            )
        if problems:
            raise StoreMismatchError(
                f"reference store {self.path} does not match this run: "
                + "; ".join(problems)
                + ". Re-run `dphrl presample` with this config, or point reference_store at the matching "
                  "store."
            )

    def rescoring_sample(self, max_tokens: int) -> list[RefSample]:
        """Stored sequences spread over D_pef prompts (one per prompt, round-robin) until ``max_tokens``
        response tokens: what :func:`verify_store` re-scores. Deterministic (same on every rank)."""
        out: list[RefSample] = []
        tokens, rnd = 0, 0
        while tokens < max_tokens:
            added = False
            for pid in self.pef_ids:
                if rnd < len(self.samples[pid]) and tokens < max_tokens:
                    out.append(self.samples[pid][rnd])
                    tokens += len(self.samples[pid][rnd].response_ids)
                    added = True
            if not added:
                break
            rnd += 1
        return out


#: Tolerated mean |stored log pi_ref - recomputed log pi| per token at train start: fp32 on both sides
#: differs by summation order only (~1e-6 measured on CPU); bf16 autocast on either side by ~1e-2.
STORE_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


def store_tolerance(store_dtype: str, train_dtype: str) -> float:
    """The documented tolerance for a store computed in ``store_dtype`` re-scored in ``train_dtype``."""
    low = (
        "bfloat16"
        if "bfloat16" in (store_dtype, train_dtype) or "float16" in (store_dtype, train_dtype)
        else "float32"
    )
    return STORE_TOLERANCE[low]


def verify_store(
    store: ReferenceStore,
    rescore: Any,
    *,
    max_tokens: int,
    tolerance: float | None = None,
    train_dtype: str = "float32",
) -> dict[str, float]:
    """Re-score a sample of stored tokens with ``rescore(samples, top_p) -> list[list[float]]`` (the
    trainer's own forward: same dtype and autocast as training, at the store's top-p) and refuse if the
    mean |delta log pi| exceeds ``tolerance`` (default :func:`store_tolerance` of the store's dtype and
    ``train_dtype``). Returns ``{"store_check/tokens", "store_check/mean_abs_diff",
    "store_check/max_abs_diff"}``. The dphrl trainer and the TRL integration both check stores here."""
    if tolerance is None:
        tolerance = store_tolerance(str(store.manifest.get("dtype", "float32")), train_dtype)
    top_p = float(store.manifest.get("sampling", {}).get("top_p", 1.0))
    sample = store.rescoring_sample(max_tokens)
    if not sample:
        return {"store_check/tokens": 0.0, "store_check/mean_abs_diff": 0.0, "store_check/max_abs_diff": 0.0}
    fresh = rescore(sample, top_p)
    diffs = [abs(a - b) for s, f in zip(sample, fresh) for a, b in zip(s.ref_logprobs, f)]
    mean, worst = sum(diffs) / len(diffs), max(diffs)
    stats = {"store_check/tokens": float(len(diffs)), "store_check/mean_abs_diff": mean,
             "store_check/max_abs_diff": worst}
    if not mean <= tolerance:  # also refuses NaN
        raise StoreMismatchError(
            f"reference store {store.path}: its stored log pi_ref do not match this model's own forward on "
            f"{len(diffs)} re-scored tokens (mean |delta| {mean:.3g}, max {worst:.3g} > tolerance "
            f"{tolerance:g}, store dtype {store.manifest.get('dtype')}). The samples were not drawn from "
            "this model at this temperature/top_p (or a checkpoint's sampling defaults leaked in). "
            + _rebuild_hint(store.path)
            + " If only numerics differ (e.g. bf16 kernels), raise store_check_tolerance."
        )
    return stats
