"""Pre-sampling and the reference store: the D_pef / D_exp split and the stored pi_ref samples.

``presample`` samples n responses per training prompt from the base model once, scores them, splits
the prompts by pass rate, and stores the correct responses of D_pef prompts with their token ids and
per-token log pi_ref (fp32, the exact distribution sampled from: same temperature, renormalized
after top-p). Training then needs no reference model. Layout of a store directory::

    manifest.json      model, tokenizer hash, sampling parameters, seed, dataset hash, counts
    prompts.parquet    prompt_id, pass_rate, n_correct, n_sampled, split ("pef" | "exp")
    samples.parquet    prompt_id, prompt_ids, response_ids, ref_logprobs, finished, text
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
from tqdm.auto import tqdm

from dphrl.data.chat import encode_prompt
from dphrl.data.example import Example
from dphrl.engines.base import Engine
from dphrl.rewards.registry import CORRECT_THRESHOLD, RewardFn, score_batch

STORE_VERSION = 1


class StoreMismatchError(ValueError):
    """The reference store was made with another model, tokenizer or sampling setting."""


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
    reward_workers: int = 0,
    progress: bool = True,
    extra_manifest: dict | None = None,
    logprob_model: Any = None,
    micro_batch_size: int = 16,
) -> dict:
    """Sample, score, split and store. Returns the manifest (also written to ``manifest.json``).

    ``logprob_model``: when given (engine vllm), the stored log pi_ref are recomputed by this model
    (one no-grad forward at ``temperature``, the computation the trainer uses for log pi_theta) instead
    of taken from the engine, whose kernels do not match the training forward. Needs ``top_p == 1``.
    """
    out_dir = Path(out_dir)
    if logprob_model is not None and top_p < 1.0:
        raise ValueError("presample: recomputing log pi_ref (engine vllm) needs top_p 1.0; use engine hf for top_p < 1")
    t0 = time.time()
    prompt_rows: list[dict] = []
    sample_rows: list[dict] = []
    failures = timeouts = 0
    bar = tqdm(total=len(examples), desc="presample", unit="prompt", disable=not progress)
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
                {"prompt_id": ex.id, "pass_rate": rate, "n_correct": len(correct), "n_sampled": n, "split": split}
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
    if logprob_model is not None and sample_rows:  # one no-grad forward, the trainer's own computation
        from dphrl.batching import pad_token_id, sequence_logprobs

        lps = sequence_logprobs(logprob_model, [r["prompt_ids"] for r in sample_rows],
                                [r["response_ids"] for r in sample_rows], pad_token_id(tokenizer), temperature,
                                micro_batch_size)
        for r, lp in zip(sample_rows, lps):
            r["ref_logprobs"] = lp
    n_pef = sum(r["split"] == "pef" for r in prompt_rows)
    manifest = {
        "store_version": STORE_VERSION,
        "model": model_name,
        "tokenizer_hash": tokenizer_hash,
        "sampling": {"n": n, "temperature": temperature, "top_p": top_p, "top_k": 0, "max_new_tokens": max_new_tokens},
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
    """Write atomically: everything goes to a temp dir that is renamed into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pq.write_table(pa.Table.from_pylist(prompt_rows, schema=_PROMPT_SCHEMA), tmp / "prompts.parquet")
    pq.write_table(pa.Table.from_pylist(sample_rows, schema=_SAMPLE_SCHEMA), tmp / "samples.parquet")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


class ReferenceStore:
    """A reference store on disk: the split and the stored pi_ref samples of D_pef prompts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise FileNotFoundError(
                f"reference store {self.path}: no manifest.json. Create it with `dphrl presample --config <your config>` "
                "(it writes to the config's reference_store directory)."
            )
        self.manifest: dict = json.loads(mf.read_text())
        prompts = pq.read_table(self.path / "prompts.parquet").to_pylist()
        self.pass_rate = {r["prompt_id"]: r["pass_rate"] for r in prompts}
        self.pef_ids = [r["prompt_id"] for r in prompts if r["split"] == "pef"]
        self.exp_ids = [r["prompt_id"] for r in prompts if r["split"] == "exp"]
        self.samples: dict[str, list[RefSample]] = {}
        for r in pq.read_table(self.path / "samples.parquet").to_pylist():
            self.samples.setdefault(r["prompt_id"], []).append(
                RefSample(r["prompt_id"], r["prompt_ids"], r["response_ids"], r["ref_logprobs"])
            )
        # D_pef prompts with at least one stored sample are the ones that can be rehearsed
        self.pef_ids = [p for p in self.pef_ids if self.samples.get(p)]

    def check_compatible(
        self, *, model: str, tokenizer_hash: str, temperature: float, examples: list[Example] | None = None
    ) -> None:
        """Refuse a store made with another model, tokenizer, temperature or dataset (clear message)."""
        m = self.manifest
        problems = []
        if m.get("tokenizer_hash") != tokenizer_hash:
            problems.append(f"tokenizer hash {m.get('tokenizer_hash')} != the model's {tokenizer_hash}")
        if _norm_model(m.get("model", "")) != _norm_model(model):
            problems.append(f"model {m.get('model')!r} != config model {model!r}")
        if abs(float(m["sampling"]["temperature"]) - temperature) > 1e-9:
            problems.append(f"sampling temperature {m['sampling']['temperature']} != config temperature {temperature}")
        if examples is not None and m.get("dataset_hash") != dataset_hash(examples):
            problems.append("dataset hash differs (the training prompts are not the ones that were pre-sampled)")
        if problems:
            raise StoreMismatchError(
                f"reference store {self.path} does not match this run: " + "; ".join(problems)
                + ". Re-run `dphrl presample` with this config, or point reference_store at the matching store."
            )


def _norm_model(name: str) -> str:
    p = Path(name)
    return str(p.resolve()) if p.exists() else name
