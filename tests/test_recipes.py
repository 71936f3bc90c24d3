"""Every recipe in recipes/ loads and dry-runs (no weights, no network, no GPU); the paper recipes carry
the paper's settings; the memory estimate matches a hand-computed case; the CPU recipe's data and
reward behave; the accelerate launch configs parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dphrl.config import ConfigError, load_config
from dphrl.data.example import Example
from dphrl.dryrun import (
    KNOWN_MODELS,
    GiB,
    activation_factor,
    dry_run,
    estimate_memory,
    known_model,
)
from dphrl.dryrun import main as dryrun_main
from dphrl.rewards.math import number_reward

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PAPER = [p for p in RECIPES if not p.name.startswith("cpu_")]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes use paths relative to the repository root


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    for alg in ("grpo", "dapo", "rkl", "dph_fkl", "dph_js"):
        assert f"bird_llama31_8b_{alg}" in names
    for alg in ("grpo", "dph_js", "dph_fkl"):
        assert f"math_qwen25_7b_{alg}" in names
    assert {"cpu_smollm2_arith_dph", "cpu_smollm2_arith_grpo", "spider_llama31_8b_dph_js"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_dry_runs(path):
    cfg = load_config(path)
    text = dry_run(cfg, examples_limit=2, load_tokenizer=False)
    assert text.rstrip().splitlines()[-1].startswith("dry run OK")
    for section in (
        "== resolved config",
        "== model ==",
        "== data ==",
        "== batch plan",
        "== memory per device",
    ):
        assert section in text
    assert (
        f"rollouts/step: {cfg.prompts_per_step} x {cfg.rollout_n} = {cfg.prompts_per_step * cfg.rollout_n}"
        in text
    )
    assert "total" in text and "GiB" in text  # every recipe's model has a known size
    data_path = Path(cfg.dataset.get("path", "."))
    if not data_path.exists():  # absent here: reported, and the rest of the plan is still there
        assert "DATA MISSING" in text
    else:
        assert "DATA MISSING" not in text and "built 2 example(s)" in text
    if cfg.algorithm == "dph":
        assert "reference_store: " + cfg.reference_store in text


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_settings(path):
    cfg = load_config(path)
    assert cfg.lr == 1e-6 and cfg.prompts_per_step == 128 and cfg.rollout_n == 16
    assert cfg.temperature == 1.0 and cfg.top_p == 1.0 and cfg.dtype == "bfloat16"
    assert cfg.clip_low == 0.2 and cfg.loss_agg == "token-mean" and cfg.dual_clip == 3.0
    assert cfg.entropy_coef == 0.0 and not cfg.lora
    assert cfg.clip_high == (0.28 if cfg.algorithm in ("dapo", "dph") else 0.2)
    assert cfg.kl_coef == (0.01 if cfg.algorithm == "rkl" else 0.0)
    if cfg.algorithm == "dph":
        assert cfg.presample_n == 8 and cfg.split_threshold == 1.0
        assert (cfg.divergence, cfg.eta) == (
            ("forward_kl", 0.01) if path.stem.endswith("fkl") else ("js", 0.2)
        )
    assert cfg.output_dir == f"runs/{path.stem}"


def test_dph_pairs_share_one_store():
    for fam in ("bird_llama31_8b", "math_qwen25_7b"):
        f, j = (load_config(ROOT / "recipes" / f"{fam}_{a}.yaml") for a in ("dph_fkl", "dph_js"))
        assert f.reference_store == j.reference_store == f"runs/{fam}/ref_store"
        assert (f.model, f.dataset, f.temperature, f.max_new_tokens) == (
            j.model,
            j.dataset,
            j.temperature,
            j.max_new_tokens,
        )


def test_memory_estimate_hand_computed():
    kw = dict(n_params=1000, trainable_params=100, hidden=8, layers=2, intermediate=16, kv_dim=4, vocab=10,
              micro_batch_size=2, seq_len=5, response_len=3, generation_batch_size=4, bf16=True)
    # activation factor 6 + 2*4/8 + 4*16/8 = 15 elements of hidden per token and layer
    assert activation_factor(8, 16, 4) == 15
    m = estimate_memory(**kw, world_size=4, sharding="fsdp")
    assert (m.weights, m.grads, m.optimizer, m.autocast_copy, m.reference_model) == (1000, 100, 200, 50, 0)
    assert m.activations == 2 * 5 * 8 * 2 * 15 * 2 == 4800
    assert m.logits == 2 * 3 * 10 * 4 * 3 == 720
    assert m.kv_cache == 4 * 5 * 2 * 2 * 4 * 2 == 640
    assert m.gen_scores == 4 * 10 * 4 * 2 == 320  # one decoding step's scores + log-softmax
    assert m.total == 1350 + 4800 + 720
    d = estimate_memory(**kw, world_size=4, sharding="ddp")  # DDP: nothing sharded
    assert (d.weights, d.grads, d.optimizer, d.autocast_copy) == (4000, 400, 800, 200)
    assert d.total == 5400 + 5520
    r = estimate_memory(**{**kw, "bf16": False}, reference_copy=True)  # fp32, rkl's frozen copy
    assert r.autocast_copy == 0 and r.reference_model == 4000 and r.activations == 9600
    big = estimate_memory(**{**kw, "generation_batch_size": 100})  # generation peak wins when larger
    assert (big.kv_cache, big.gen_scores) == (16000, 8000) and big.total == big.static + 24000
    with pytest.raises(ValueError):
        estimate_memory(**kw, sharding="zero2")


def test_known_model_sizes():
    from dphrl.dryrun import _count_params

    hit = known_model("meta-llama/Llama-3.1-8B-Instruct")
    total, lora = _count_params(json.dumps(hit[1], sort_keys=True), 16, "all-linear")
    assert total == 8_030_261_248  # the published count
    assert lora == 16 * (9 * 4096 + 2 * 1024 + 3 * 14336) * 32
    assert known_model("SmolLM2-135M-Instruct.Q4_1.gguf")[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert known_model("/models/Qwen2.5-Math-7B")[0] == "Qwen/Qwen2.5-Math-7B"
    assert known_model("some/other-model") is None
    smol = KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    # tied embeddings
    assert _count_params(json.dumps(smol, sort_keys=True), 16, "all-linear")[0] == 134_515_008


def test_bird_dph_plan_on_eight_gpus():
    cfg = load_config(ROOT / "recipes" / "bird_llama31_8b_dph_js.yaml")
    text = dry_run(cfg, examples_limit=1, world_size=8, sharding="fsdp", load_tokenizer=False)
    assert "this launch: fsdp x 8" in text
    assert "rollouts/step: 128 x 16 = 2048 sequences (256 per process)" in text
    assert "max sequence length: 4096 prompt + 1024 response = 5120 tokens" in text
    assert "optimizer updates: 150 steps x 4 = 600" in text
    assert "8.03B parameters" in text
    assert "DeepSpeed" not in text.split("warnings")[-1]  # FSDP is supported: no limitation to report
    z3 = dry_run(cfg, examples_limit=1, world_size=8, sharding="zero3", load_tokenizer=False)
    assert "refuses DeepSpeed" in z3  # the known limitation is surfaced
    lora = dry_run(
        load_config(ROOT / "recipes" / "bird_llama31_8b_dph_js.yaml", ["lora=true"]),
        examples_limit=1,
        world_size=8,
        sharding="fsdp",
        load_tokenizer=False,
    )
    assert "lora=true under FSDP is refused" in lora
    m = estimate_memory(n_params=8_030_261_248, trainable_params=8_030_261_248, hidden=4096, layers=32,
                        intermediate=14336, kv_dim=1024, vocab=128256, micro_batch_size=1, seq_len=5120,
                        response_len=1024, generation_batch_size=16, bf16=True, world_size=8, sharding="fsdp")
    assert 40 * GiB < m.total < 50 * GiB  # fits an 80 GiB GPU under FSDP x 8
    assert f"{m.total / GiB:,.2f} GiB" in text


def test_dry_run_rejects_bad_reward_and_dataset(tmp_path):
    base = ROOT / "recipes" / "cpu_smollm2_arith_grpo.yaml"
    with pytest.raises(ConfigError, match="reward"):
        dry_run(load_config(base, ["reward=no_such_reward"]), examples_limit=1, load_tokenizer=False)
    with pytest.raises(ConfigError, match="dataset"):
        dry_run(load_config(base, ["dataset.bogus_option=1"]), examples_limit=1, load_tokenizer=False)


def test_dry_run_reports_store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({
        "model": "smollm2-135m-instruct", "sampling": {"temperature": 1.0}, "threshold": 0.75,
        "counts": {"prompts": 32, "d_pef": 8, "d_exp": 24, "stored_samples": 56}, "mean_pass_rate": 0.4,
    }))
    cfg = load_config(ROOT / "recipes" / "cpu_smollm2_arith_dph.yaml", [f"reference_store={store}"])
    text = dry_run(cfg, examples_limit=1, load_tokenizer=False)
    assert "found: 32 prompts, D_pef 8, D_exp 24, 56 stored samples" in text
    assert "MISMATCH: store sampling.temperature 1.0 != config temperature 0.7" in text
    assert "MISMATCH: store_version None != 2" in text
    # 4 prompts/step * 8/24 -> 1 D_pef prompt with 56/8 = 7 samples
    assert "reference prompts/step: 1 D_pef prompt(s) x ~7.0 stored samples" in text


def test_dryrun_module_main(capsys):
    assert dryrun_main(["--config", "recipes/math_qwen25_7b_dph_fkl.yaml", "--num-processes", "8",
                        "--sharding", "zero3", "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch plan (8 processes, zero3)" in out and "7.62B parameters" in out
    assert dryrun_main(["--config", "recipes/math_qwen25_7b_dph_fkl.yaml", "lr=-1"]) == 2


def test_cpu_recipe_data_and_reward():
    cfg = load_config(ROOT / "recipes" / "cpu_smollm2_arith_dph.yaml")
    assert cfg.model == "smollm2-135m-instruct" and cfg.lora and cfg.temperature == 0.7
    from dphrl.data.loaders import load_dataset_spec

    train = load_dataset_spec({**cfg.dataset, "limit": None})
    test = load_dataset_spec({**cfg.dataset, "path": "recipes/data/arith1d_test.jsonl", "limit": None})
    assert len(train) == 57 and len(test) == 24
    assert not {e.id for e in train} & {e.id for e in test}
    for ex in train + test:
        a, b = map(int, ex.id.split("-")[1:])
        assert 1 <= a <= 9 and 1 <= b <= 9 and ex.answer == str(a + b)
        assert ex.prompt == [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}]
    grpo = load_config(ROOT / "recipes" / "cpu_smollm2_arith_grpo.yaml")
    assert grpo.algorithm == "grpo" and grpo.dataset == cfg.dataset and grpo.reward == cfg.reward


@pytest.mark.parametrize(("response", "expected"), [
    ("13", 1.0), ("13.", 1.0), (" 13\n", 1.0), ("8 + 5 = 13", 1.0), ("The answer is 13.", 1.0),
    ("\\boxed{13}", 1.0), ("1,3", 0.0), ("12", 0.0), ("thirteen", 0.0), ("", 0.0), ("12\n13", 0.0),
    ("The sum of 8 and 5 is 13.", 1.0), ("13.0", 1.0),
])
def test_number_reward(response, expected):
    ex = Example(id="add-8-5", prompt=[], answer="13")
    assert number_reward(response, ex) == expected


def test_number_reward_via_registry():
    from dphrl.rewards import get_reward

    assert get_reward("number") is number_reward
    assert get_reward("dphrl.rewards.math:number_reward") is number_reward


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for name in ("ddp", "fsdp", "deepspeed_zero3"):
        c = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
        assert c.num_processes == 8 and c.mixed_precision == "bf16" and not c.use_cpu
        kinds[name] = str(c.distributed_type)
    assert kinds == {"ddp": "DistributedType.MULTI_GPU", "fsdp": "DistributedType.FSDP",
                     "deepspeed_zero3": "DistributedType.DEEPSPEED"}
    assert (ROOT / "recipes" / "accelerate" / "cpu_2proc.md").is_file()
