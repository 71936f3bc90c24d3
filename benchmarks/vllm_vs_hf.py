"""The vLLM engine against the Hugging Face engine on the same prompts (needs a CUDA GPU and vLLM).

Evaluates one model with both engines on the demo's styles task (or any ``--data`` spec) and prints
the reward statistics side by side (pass@k, mean reward, style shares: they should agree within
sampling noise, since both sample the same distribution) and the generation time of each:

    python benchmarks/vllm_vs_hf.py --model runs/demo/seed0/base_model --n 16 --problems 200

Writes ``--out``/{hf,vllm}/results.json and ``--out``/comparison.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="A model dir (save_pretrained) or built-in name.")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=28)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default="runs/vllm_vs_hf")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (and pip install 'dphrl[vllm]')")

    from dphrl.engines.hf import HFEngine
    from dphrl.engines.vllm import VLLMEngine
    from dphrl.evaluation.runner import evaluate
    from dphrl.models import engine_model_path, load_model, load_tokenizer
    from dphrl.tasks import styles

    tok = load_tokenizer(args.model)
    data = {"add": styles.make_examples("add", "test", limit=args.problems)}
    common = dict(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0,
                  style_fn=styles.style_of, answer_fn=styles.final_answer, show_table=False, progress=False)
    results, seconds = {}, {}
    for name in ("hf", "vllm"):
        if name == "hf":
            engine = HFEngine(load_model(args.model, dtype="bfloat16", device="cuda"), tok, batch_size=512)
        else:
            engine = VLLMEngine(
                engine_model_path(args.model), tok, dtype="bfloat16", gpu_memory_utilization=0.5
            )
        engine.generate([[tok.convert_tokens_to_ids("1")]], 2, max_new_tokens=4)  # warm-up
        torch.cuda.synchronize()
        t0 = time.time()
        results[name] = evaluate(
            engine, tok, data, styles.styles_reward, out_dir=Path(args.out) / name, **common
        )
        torch.cuda.synchronize()
        seconds[name] = time.time() - t0
        del engine
        torch.cuda.empty_cache()
    rows = {}
    for name, res in results.items():
        d = res["datasets"]["add"]
        rows[name] = {
            "seconds": round(seconds[name], 2),
            "pass@1": d["pass@k"]["1"],
            f"pass@{args.n}": d["pass@k"][str(args.n)],
            "styles": d["styles"]["shares"],
            "effective_styles": d["styles"]["effective_styles"],
        }
    rows["speedup_vllm_over_hf"] = round(seconds["hf"] / seconds["vllm"], 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "comparison.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
