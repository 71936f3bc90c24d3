"""The vLLM engine's glue, on CPU, against a stand-in ``vllm`` module.

vLLM itself needs a CUDA GPU, so these tests replace the ``vllm`` module by a small double with the
same surface (``LLM``, ``SamplingParams``, ``inputs.TokensPrompt``, ``llm_engine.model_executor.
driver_worker.model_runner.model.load_weights``) whose generation is Hugging Face ``generate`` on a
private copy of the model. The double mirrors what the real releases do (checked in their source,
0.8.5 to 0.34, docs/recipes.md "vLLM: versions checked"): ``SamplingParams`` takes only fields every
checked release has; ``LLM.generate`` takes one ``SamplingParams`` or a list, one per prompt; the
engine core is in-process (``llm_engine.model_executor`` exists) only when
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` or ``external_launcher``; ``driver_worker`` forwards attributes to
its ``worker`` (``WorkerWrapperBase``); ``apply_model`` goes through ``llm_engine.model_executor``. What they
check is ours: sampling parameters passed through, vLLM outputs turned into ``Generation`` (EOS kept, finished
flag, text), weights pushed before every rollout under plain Hugging Face names (LoRA merged), pi_old
recomputed, and log pi_ref recomputed at presample. The real engine's numbers (rewards vs the HF engine,
speed) are measured on a GPU: ``benchmarks/vllm_vs_hf.py``.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from conftest import base_cfg, make_store, toy_examples, toy_first_char

import dphrl.engines.vllm as vllm_engine
from dphrl.config import ConfigError, TrainConfig
from dphrl.engines.hf import HFEngine
from dphrl.engines.vllm import VLLMEngine, VLLMUnavailableError
from dphrl.models import load_model, load_tokenizer, tokenizer_hash
from dphrl.reference import ReferenceStore, presample
from dphrl.trainer import Trainer


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    """vllm.outputs.CompletionOutput (the fields the engine reads, plus those it must not need)."""

    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str
    index: int = 0
    text: str = ""  # detokenize=False / skip_tokenizer_init: vLLM returns no text
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None


@dataclass
class _Request:
    outputs: list[_Completion]


class _Runner:
    """Holds the private model; ``load_weights`` copies tensors by name, every name must exist."""

    def __init__(self, model: torch.nn.Module):
        self.model = self
        self.hf = model
        self.loaded: list[set[str]] = []

    def load_weights(self, weights):
        sd = self.hf.state_dict()
        names = set()
        for name, t in weights:
            if name not in sd:
                raise KeyError(f"unknown weight {name!r}")
            sd[name].copy_(t)
            names.add(name)
        self.loaded.append(names)


#: SamplingParams fields present in every checked release (0.8.5.post1, 0.10.2, 0.26.0, 0.32.0, 0.34.0)
#: that a caller may set; an unknown keyword is a TypeError, as for the real msgspec struct.
SAMPLING_FIELDS = frozenset(
    {
        "n",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "bad_words",
        "ignore_eos",
        "max_tokens",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "detokenize",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "output_kind",
        "logit_bias",
        "allowed_token_ids",
        "extra_args",
    }
)


class _WorkerWrapper:
    """vllm's WorkerWrapperBase: attributes not found on it are the worker's."""

    def __init__(self, worker):
        self.worker = worker

    def __getattr__(self, attr):
        return getattr(self.worker, attr)


def fake_vllm(drop_eos: bool = False) -> types.ModuleType:
    """A stand-in ``vllm`` module; ``drop_eos`` mimics versions whose token_ids omit the stop token."""
    mod = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")

    def tokens_prompt(prompt_token_ids):
        return {"prompt_token_ids": prompt_token_ids}

    inputs.TokensPrompt = tokens_prompt

    class SamplingParams:
        def __init__(self, **kw):
            unknown = set(kw) - SAMPLING_FIELDS
            if unknown:
                raise TypeError(f"Unexpected keyword argument {sorted(unknown)}")
            self.__dict__.update(kw)

    class LLM:
        instances: list = []

        def __init__(self, model: str, **kw):
            self.kwargs = kw
            hf = load_model(model)
            self.tok = load_tokenizer(model)
            self.runner = _Runner(hf)
            # vLLM's ParallelConfig does this
            if kw.get("distributed_executor_backend") == "external_launcher":
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
            if self.in_process:  # only then does LLMEngine keep model_executor (v1/engine/llm_engine.py)
                worker = _WorkerWrapper(types.SimpleNamespace(model_runner=self.runner))
                self.llm_engine = types.SimpleNamespace(
                    model_executor=types.SimpleNamespace(driver_worker=worker)
                )
            else:  # the engine core in a subprocess: nothing to reach from here
                self.llm_engine = types.SimpleNamespace()
            self.calls: list = []
            self.prefix_resets = 0
            LLM.instances.append(self)

        def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
            if isinstance(sampling_params, list):
                if len(sampling_params) != len(prompts):
                    raise ValueError("The lengths of prompts and params must be the same.")
                per_prompt = sampling_params
            else:
                per_prompt = [sampling_params] * len(prompts)
            self.calls.append(sampling_params)
            eng = HFEngine(self.runner.hf, self.tok)
            out = []
            for prompt, params in zip(prompts, per_prompt):  # each request with its own params (its own seed)
                (gs,) = eng.generate(
                    [prompt["prompt_token_ids"]], params.n, max_new_tokens=params.max_tokens,
                    temperature=params.temperature or 1.0, top_p=params.top_p, greedy=params.temperature == 0,
                    seed=params.seed,
                )
                comps = []
                for i, g in enumerate(gs):
                    ids, lps = list(g.response_ids), list(g.logprobs)
                    if drop_eos and g.finished:
                        ids, lps = ids[:-1], lps[:-1]
                    comps.append(_Completion(ids, [{t: _Logprob(lp)} for t, lp in zip(ids, lps)],
                                             "stop" if g.finished else "length", index=i))
                out.append(_Request(comps))
            return out

        def apply_model(self, func):
            # 0.8.5 / 0.10.2: AttributeError out of process
            return self.llm_engine.model_executor.apply_model(func)

        def reset_prefix_cache(self) -> bool:
            self.prefix_resets += 1
            return True

    mod.LLM, mod.SamplingParams, mod.inputs = LLM, SamplingParams, inputs
    return mod


@pytest.fixture
def with_fake_vllm(monkeypatch):
    def install(drop_eos: bool = False):
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # vLLM's default; restored after
        mod = fake_vllm(drop_eos)
        monkeypatch.setitem(sys.modules, "vllm", mod)
        monkeypatch.setitem(sys.modules, "vllm.inputs", mod.inputs)
        monkeypatch.setattr(vllm_engine, "_cuda_available", lambda: True)
        return mod

    return install


@pytest.fixture
def model_dir(tmp_path, tok, make_model):
    d = tmp_path / "base_model"
    make_model(seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_missing_vllm_or_gpu_says_how_to_fix(monkeypatch, tmp_path, model_dir, tok, with_fake_vllm):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(VLLMUnavailableError, match=r"pip install 'dphrl\[vllm\]'"):
        VLLMEngine(model_dir, tok)
    with_fake_vllm()
    monkeypatch.setattr(vllm_engine, "_cuda_available", lambda: False)
    with pytest.raises(VLLMUnavailableError, match="needs a CUDA GPU"):
        VLLMEngine(model_dir, tok)


def test_engine_auto_picks_vllm_only_when_it_can_run(monkeypatch):
    from dphrl.engines import resolve_engine

    c = TrainConfig(model="m", algorithm="grpo")
    assert (c.engine, c.old_logprob) == ("auto", None)  # the config never depends on the machine
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    assert (resolve_engine("auto"), c.old_logprob_for(resolve_engine("auto"))) == ("hf", "rollout")
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    assert (resolve_engine("auto"), c.old_logprob_for(resolve_engine("auto"))) == ("vllm", "recompute")
    assert (
        resolve_engine("hf") == "hf" and TrainConfig(model="m", algorithm="grpo", engine="hf").engine == "hf"
    )


def test_old_logprob_rollout_is_refused_with_vllm(tmp_path):
    with pytest.raises(ConfigError, match="old_logprob"):
        base_cfg(tmp_path, "grpo", engine="vllm", old_logprob="rollout")
    assert base_cfg(tmp_path, "grpo", engine="vllm").old_logprob == "recompute"
    assert TrainConfig(model="m", algorithm="grpo", engine="hf").old_logprob == "rollout"


@pytest.mark.parametrize("drop_eos", [False, True])
def test_outputs_become_generations(with_fake_vllm, model_dir, tok, drop_eos):
    mod = with_fake_vllm(drop_eos)
    eng = VLLMEngine(model_dir, tok, seed=3)
    assert eng.exact_logprobs and mod.LLM.instances[-1].kwargs["logprobs_mode"] == "processed_logprobs"
    prompts = [
        [tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("+")],
        [tok.convert_tokens_to_ids("2")],
    ]
    gens = eng.generate(prompts, 6, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=11)
    per_prompt = mod.LLM.instances[-1].calls[-1]
    params = per_prompt[0]
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens, params.seed) == (
        6, 0.7, 0.9, -1, 5, 11)
    assert params.stop_token_ids == [tok.eos_token_id] and params.logprobs == 0
    # vLLM gives the n samples of a request seed + index: prompt p starts at 11 + p * n, no stream shared
    assert [p.seed for p in per_prompt] == [11, 17]
    ref_eng = HFEngine(load_model(model_dir), tok)
    ref = [ref_eng.generate([p], 6, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=11 + 6 * i)[0]
           for i, p in enumerate(prompts)]
    n_finished = 0
    for gs, rs in zip(gens, ref):
        assert len(gs) == 6
        for g, r in zip(gs, rs):
            assert g.response_ids == r.response_ids  # EOS restored when the engine dropped it
            assert g.finished == r.finished and g.text == r.text
            if g.finished:
                n_finished += 1
                assert g.response_ids[-1] == tok.eos_token_id
            k = len(r.response_ids) - (1 if drop_eos and r.finished else 0)
            assert g.logprobs[:k] == pytest.approx(r.logprobs[:k])
    assert n_finished > 0  # the case that matters was exercised


@pytest.mark.parametrize("greedy", [False, True])
def test_sampling_params_are_explicitly_neutral(with_fake_vllm, model_dir, tok, greedy):
    """T and top-p as requested; every other field that changes the distribution or the stopping is
    passed, neutral (nothing left to a vLLM default or to the checkpoint's generation_config.json)."""
    mod = with_fake_vllm()
    eng = VLLMEngine(model_dir, tok, seed=3)
    llm = mod.LLM.instances[-1]
    assert llm.kwargs["generation_config"] == "vllm"  # vLLM's defaults, not the checkpoint's
    eng.generate([[tok.convert_tokens_to_ids("1")]], 1 if greedy else 3, max_new_tokens=4, temperature=0.7,
                 top_p=0.9, greedy=greedy, seed=11)
    assert vars(llm.calls[-1][0]) == {
        "n": 1 if greedy else 3,
        "temperature": 0.0 if greedy else 0.7,
        "top_p": 1.0 if greedy else 0.9,
        "top_k": -1,
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "logit_bias": None,
        "allowed_token_ids": None,
        "min_tokens": 0,
        "max_tokens": 4,
        "stop": [],
        "stop_token_ids": [tok.eos_token_id],
        "ignore_eos": True,  # only our stop_token_ids stop: not the checkpoint's other EOS ids
        "seed": 11,
        "logprobs": 0,
        "detokenize": False,
        "skip_special_tokens": False,
    }


@pytest.mark.parametrize("rejected", [(), ("generation_config",), ("logprobs_mode",),
                                      ("logprobs_mode", "generation_config"), ("unnamed",)])
def test_optional_llm_arguments_fall_back_on_older_vllm(with_fake_vllm, model_dir, tok, rejected):
    """A vLLM that does not know an optional keyword (TypeError naming it) is built without it only."""
    mod = with_fake_vllm()
    base = mod.LLM

    class OlderLLM(base):
        def __init__(self, model, **kw):
            for k in rejected:
                if k in kw or (k == "unnamed" and ("logprobs_mode" in kw or "generation_config" in kw)):
                    raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{k}'")
            super().__init__(model, **kw)

    mod.LLM = OlderLLM
    eng = VLLMEngine(model_dir, tok)
    kw = base.instances[-1].kwargs
    dropped = {"logprobs_mode", "generation_config"} if "unnamed" in rejected else set(rejected)
    assert (
        set(kw) & {"logprobs_mode", "generation_config"} == {"logprobs_mode", "generation_config"} - dropped
    )
    assert eng.exact_logprobs == ("logprobs_mode" not in dropped)
    assert kw["skip_tokenizer_init"] is True and kw["seed"] == 0  # the required ones always passed


def test_unrelated_type_error_is_raised(with_fake_vllm, model_dir, tok):
    mod = with_fake_vllm()

    class BrokenLLM(mod.LLM):
        def __init__(self, model, **kw):
            raise TypeError("dtype must be a string")

    mod.LLM = BrokenLLM
    with pytest.raises(TypeError, match="dtype must be a string"):
        VLLMEngine(model_dir, tok)


@pytest.mark.parametrize("distributed", [False, True])
def test_engine_core_runs_in_process_so_weights_reach_the_model(with_fake_vllm, model_dir, tok, make_model,
                                                                 distributed):
    """vLLM's default engine core is a subprocess whose model nothing here can reach: the engine builds
    it in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and pushes weights through model_executor."""
    mod = with_fake_vllm()
    eng = VLLMEngine(model_dir, tok, distributed=distributed)
    llm = mod.LLM.instances[-1]
    assert llm.in_process and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert (llm.kwargs.get("distributed_executor_backend") == "external_launcher") == distributed
    new = make_model(seed=5)
    eng.sync_weights(new)
    got = llm.runner.hf.state_dict()
    for k, v in new.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert eng.weight_pushes == 1 and llm.prefix_resets == 1
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # an LLM built with its engine core in a subprocess
    out_of_process = mod.LLM(model_dir)
    with pytest.raises(RuntimeError, match="no in-process model_executor"):
        VLLMEngine(model_dir, tok, llm=out_of_process).sync_weights(new)


def test_unseeded_call_passes_one_params_object(with_fake_vllm, model_dir, tok):
    """Without a seed, one SamplingParams for all prompts: vLLM draws a fresh seed per request."""
    mod = with_fake_vllm()
    eng = VLLMEngine(model_dir, tok)
    prompts = [[tok.convert_tokens_to_ids("1")], [tok.convert_tokens_to_ids("2")]]
    gens = eng.generate(prompts, 2, max_new_tokens=3)
    params = mod.LLM.instances[-1].calls[-1]
    assert not isinstance(params, list) and params.seed is None
    assert [len(gs) for gs in gens] == [2, 2]


def _full_weights(policy, lora: bool) -> dict[str, torch.Tensor]:
    import copy

    if lora:
        return copy.deepcopy(policy).merge_and_unload().state_dict()
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


@pytest.mark.parametrize("lora", [False, True])
def test_trainer_pushes_current_weights_before_every_rollout(with_fake_vllm, tmp_path, model_dir, lora):
    mod = with_fake_vllm()
    cfg = base_cfg(
        tmp_path, "grpo", model=model_dir, engine="vllm", max_steps=3, lora=lora, lora_r=4, lr=5e-2
    )
    trainer = Trainer(cfg, examples=toy_examples(8))
    assert trainer.cfg.old_logprob == "recompute"
    llm = mod.LLM.instances[-1]
    pushed: list[dict[str, torch.Tensor]] = []
    load = llm.runner.load_weights
    llm.runner.load_weights = lambda w: (
        load(w),
        pushed.append({k: v.clone() for k, v in llm.runner.hf.state_dict().items()}),
    )
    policy_before_step = [_full_weights(trainer._unwrapped(), lora)]
    update = trainer.update

    def update_and_snapshot(*a):
        out = update(*a)
        policy_before_step.append(_full_weights(trainer._unwrapped(), lora))
        return out

    trainer.update = update_and_snapshot
    trainer.train()
    assert trainer.engine.weight_pushes == 3 and len(llm.calls) == 3 and llm.prefix_resets == 3
    base_names = set(load_model(model_dir).state_dict())
    assert all(names == base_names for names in llm.runner.loaded)  # plain HF names, every weight
    assert len(pushed) == 3
    for step, got in enumerate(pushed):  # rollout of step i ran on the policy after i updates
        want = policy_before_step[step]
        assert set(got) == set(want)
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(pushed[0][k], pushed[2][k]) for k in pushed[0])  # training moved the weights
    if lora:  # the pushes never touch the module: the frozen base weights are bit-exact the initial ones
        torch.testing.assert_close(
            trainer._unwrapped().get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
            load_model(model_dir).model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0,
        )


def test_presample_recomputes_reference_logprobs(tmp_path, tok, make_model, with_fake_vllm):
    """An engine whose log-probs are garbage: the store holds the HF model's exact log-probs anyway."""
    model = make_model(seed=1)
    exs = toy_examples(6, always=3)

    class BadLogprobEngine(HFEngine):
        def generate(self, *a, **kw):
            gens = super().generate(*a, **kw)
            for gs in gens:
                for g in gs:
                    g.logprobs = [float("nan")] * len(g.logprobs)
            return gens

    out = tmp_path / "store"
    m = presample(BadLogprobEngine(model, tok), tok, exs, toy_first_char, out, model_name="tiny-toy",
                  tokenizer_hash=tokenizer_hash(tok), n=4, max_new_tokens=3, temperature=0.8, progress=False,
                  logprob_model=model)
    ref_dir = tmp_path / "ref"
    # HF engine, exact log-probs, same seed
    want_m = make_store(ref_dir, model, tok, exs, n=4, temperature=0.8)
    assert m["ref_logprobs_source"] == "recomputed" and want_m["ref_logprobs_source"] == "engine"
    assert m["counts"] == want_m["counts"] and m["counts"]["stored_samples"] >= 12
    got, want = ReferenceStore(out), ReferenceStore(ref_dir)
    for pid, samples in want.samples.items():
        for a, b in zip(got.samples[pid], samples):
            assert a.response_ids == b.response_ids
            assert a.ref_logprobs == pytest.approx(b.ref_logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="top_p 1.0"):
        presample(BadLogprobEngine(model, tok), tok, exs, toy_first_char, out, model_name="t",
                  tokenizer_hash="h", top_p=0.9, progress=False, logprob_model=model)
