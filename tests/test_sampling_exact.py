"""What is sampled is what is stored, whatever the checkpoint's ``generation_config.json`` says.

Tiny Llama / Qwen2 checkpoints (random init, 43-token vocabulary) carry the sampling defaults of
Llama-3.1-8B-Instruct and Qwen2.5-7B-Instruct, written with ``save_pretrained`` and read back with
``load_model`` as a downloaded checkpoint is. ``HFEngine`` must draw from exactly the requested
distribution, softmax(logits / T) renormalized over the top-p nucleus of the model's own forward,
store exactly its log-probs, and let no other field of the checkpoint's config take part (transformers
fills every field left unset from it).

The distribution test is a chi-square goodness of fit (first token and two later positions) at
significance 1e-6, shown to have power: the same test on the same samples rejects the checkpoint's
distribution and a temperature 25% off. The samples come from the engine's default path, the shared
prompt prefill (one prompt forward, its KV cache copied to the N rows; checked in the fixture), so
these tests also prove that path's distribution and log-probs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from dphrl.batching import pack
from dphrl.data.chat import encode_prompt
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.engines.base import Generation
from dphrl.engines.compact import CompactHFEngine
from dphrl.engines.hf import (
    HFEngine,
    _ChosenTokenLogprobs,
    checkpoint_defaults_off,
    neutral_generation_config,
)
from dphrl.models import apply_lora, load_model
from dphrl.testing import tiny_causal_lm

CHARS = "0123456789+abcdefghijklmnopqrstuvwxyz"  # 6 special tokens + 37 characters = 43
TOK = build_char_tokenizer(CHARS)
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
ALPHA = 1e-6  # significance: a correct sampler fails one position's test with probability 1e-6
N = 4000  # samples per (arch, T, top-p): a 25% temperature error gives p < 1e-27 at the first token
STEPS = 3  # positions tested: the first token and two later ones


def instruct_defaults(arch: str) -> dict:
    """The checkpoint's generation_config.json, with this vocabulary's ids for the special tokens.

    Llama-3.1-8B-Instruct: {"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001,
    128008, 128009], "temperature": 0.6, "top_p": 0.9}. Qwen2.5-7B-Instruct: {"bos_token_id": 151643,
    "pad_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643], "repetition_penalty":
    1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20} (its pad token is one of its EOS ids).
    """
    if arch == "llama":
        return dict(
            bos_token_id=TOK.bos_token_id,
            do_sample=True,
            eos_token_id=[3, 4, EOS],
            temperature=0.6,
            top_p=0.9,
        )
    return dict(bos_token_id=PAD, pad_token_id=PAD, do_sample=True, eos_token_id=[EOS, PAD],
                repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)


#: Every other generation field a checkpoint could set, each set to a value that changes the tokens,
#: the stopping or the output format (all survive save_pretrained / from_pretrained).
HOSTILE = dict(
    repetition_penalty=1.5,
    min_p=0.05,
    top_h=0.5,
    typical_p=0.9,
    epsilon_cutoff=3e-3,
    eta_cutoff=3e-3,
    encoder_repetition_penalty=1.3,
    no_repeat_ngram_size=2,
    encoder_no_repeat_ngram_size=2,
    bad_words_ids=[[7]],
    suppress_tokens=[8],
    begin_suppress_tokens=[9],
    sequence_bias=[[[10], 3.0]],
    forced_bos_token_id=11,
    forced_eos_token_id=12,
    min_new_tokens=3,
    min_length=30,
    exponential_decay_length_penalty=(1, 2.0),
    guidance_scale=2.0,
    renormalize_logits=True,
    remove_invalid_values=True,
    watermarking_config={"greenlist_ratio": 0.5, "bias": 4.0},
    stop_strings=["7"],
    max_time=1e-6,
    max_new_tokens=2,
    max_length=3,
    num_beams=2,
    length_penalty=0.5,
    early_stopping=True,
    num_return_sequences=2,
    return_dict_in_generate=True,
    output_scores=True,
    output_logits=True,
    use_cache=False,
    token_healing=True,
    prompt_lookup_num_tokens=2,
    penalty_alpha=0.6,
    dola_layers="low",
    custom_entry=3,
)


def _checkpoint(directory: Path, arch: str, gen_fields: dict) -> PreTrainedModel:
    """A tiny model whose generation_config.json holds ``gen_fields``, saved and loaded back."""
    model = tiny_causal_lm(TOK, arch=arch, hidden=32, layers=2, seed=1)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)  # sharper (tied) logits: the nuclei below truncate
    model.generation_config = GenerationConfig(**gen_fields)
    model.save_pretrained(directory)
    TOK.save_pretrained(directory)
    loaded = load_model(directory)
    on_disk = loaded.generation_config.to_diff_dict()
    assert all(
        on_disk[k] == v
        for k, v in gen_fields.items()
        if k not in ("watermarking_config", "exponential_decay_length_penalty")
    )
    return loaded


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> dict[str, PreTrainedModel]:
    """arch -> a checkpoint carrying that instruct model's real sampling defaults."""
    return {a: _checkpoint(tmp_path_factory.mktemp(a), a, instruct_defaults(a)) for a in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, PreTrainedModel]:
    """arch -> the same weights with the instruct defaults and every field of HOSTILE on disk."""
    return {a: _checkpoint(tmp_path_factory.mktemp(a + "_hostile"), a, {**instruct_defaults(a), **HOSTILE})
            for a in ("llama", "qwen2")}


def _neutral_twin(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights with transformers' plain generation config (the checkpoint's removed)."""
    twin = tiny_causal_lm(TOK, arch=model.config.model_type, hidden=32, layers=2, seed=1)
    twin.load_state_dict(model.state_dict())
    twin.generation_config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS)
    return twin.eval()


def _prompts() -> list[list[int]]:
    return [encode_prompt(TOK, [{"role": "user", "content": c}]) for c in ("12+7", "a+b")]


# --------------------------------------------------------------------------------------------------
# reference distributions, from the model's own forward


def _forward_logits(model: PreTrainedModel, gens: list[Generation]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, T, V) logits predicting each response token, the (B, P + T) packed ids, and P."""
    b = pack([g.prompt_ids for g in gens], [g.response_ids for g in gens], PAD)
    with torch.no_grad():
        logits = model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids
        ).logits
    return logits[:, b.prompt_len - 1 : -1].float(), b.input_ids, b.prompt_len  # (B, T, V)


def requested(
    logits: torch.Tensor, temperature: float, top_p: float, dist_temperature: float | None = None
) -> torch.Tensor:
    """softmax(logits / T) renormalized over its top-p nucleus; (..., V) probabilities.

    ``dist_temperature``: the same nucleus, probabilities at another temperature (a wrong sampler with
    the right support, for the power check).
    """
    scaled = logits / temperature  # (..., V)
    probs = torch.softmax(scaled, -1)
    sp, idx = probs.sort(-1, descending=True)
    drop_sorted = (sp.cumsum(-1) - sp) >= top_p  # tokens after the nucleus is full
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)  # (..., V)
    inner = logits / (dist_temperature or temperature)
    return torch.softmax(inner.masked_fill(drop, float("-inf")), -1)


def checkpoint_distribution(ids: torch.Tensor, logits: torch.Tensor, fields: dict) -> torch.Tensor:
    """What ``model.generate(do_sample=True)`` samples from with the checkpoint's defaults: its
    repetition penalty, temperature, top-k and top-p, applied by transformers' own processors in
    transformers' order. ids: (B, L) prefix, logits: (B, V); returns (B, V)."""
    procs = (
        [RepetitionPenaltyLogitsProcessor(fields["repetition_penalty"])]
        if "repetition_penalty" in fields
        else []
    )
    procs += [TemperatureLogitsWarper(fields["temperature"]), TopKLogitsWarper(fields.get("top_k", 50)),
              TopPLogitsWarper(fields["top_p"])]
    scores = logits.clone()  # (B, V)
    for p in procs:
        scores = p(ids, scores)
    return torch.softmax(scores, -1)


def gof_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness-of-fit p-value of ``tokens`` (B,) drawn from the rows of ``probs`` (B, V).

    Expected counts are sum_i probs[i] (every row the same for a first token; the prefix's conditional
    at later positions, where the count of token v minus its expectation is a sum of independent zero
    mean terms whose covariance is at most the multinomial one: the chi-square(df) tail is then
    conservative). Bins expecting fewer than 5 are pooled. A token of probability 0 gives p = 0.
    """
    if bool((probs.gather(-1, tokens[:, None]) == 0).any()):
        return 0.0
    observed = torch.bincount(tokens, minlength=probs.shape[-1]).double()  # (V,)
    expected = probs.double().sum(0)  # (V,)
    small = expected < 5
    o, e = observed[~small], expected[~small]
    if small.any():
        po, pe = observed[small].sum(), expected[small].sum()
        if pe < 5 and len(e):  # the pooled bin is still small: merge in the smallest regular bin
            j = int(e.argmin())
            po, pe = po + o[j], pe + e[j]
            o, e = torch.cat([o[:j], o[j + 1 :]]), torch.cat([e[:j], e[j + 1 :]])
        o, e = torch.cat([o, po[None]]), torch.cat([e, pe[None]])
    chi2 = ((o - e) ** 2 / e).sum()
    df = torch.tensor((len(e) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, chi2 / 2))


@dataclass
class Sampled:
    gens: list[Generation]
    logits: torch.Tensor  # (B, T, V) forward logits predicting each response token
    ids: torch.Tensor  # (B, P + T) packed prompt + response
    prompt_len: int


@pytest.fixture(scope="module")
def sampled(instruct):
    """(arch, T, top_p) -> N responses of STEPS tokens to one prompt, sampled once per module."""
    cache: dict[tuple, Sampled] = {}

    def get(arch: str, temperature: float, top_p: float, engine: str = "hf") -> Sampled:
        key = (arch, temperature, top_p, engine)
        if key not in cache:
            model = instruct[arch]
            eng = {"hf": HFEngine, "hf-compact": CompactHFEngine}[engine](model, TOK, batch_size=N)
            prefills: list = []
            shared = eng._prefill_shared
            eng._prefill_shared = lambda *a: prefills.append(shared(*a)) or prefills[-1]
            gens = eng.generate(
                _prompts()[:1], N, max_new_tokens=STEPS, temperature=temperature, top_p=top_p, seed=0)[0]
            assert len(prefills) == 1 and prefills[0] is not None  # the shared-prefill path is the one tested
            cache[key] = Sampled(gens, *_forward_logits(model, gens))
        return cache[key]

    return get


SETTINGS = [(1.0, 1.0), (0.7, 0.9)]


# --------------------------------------------------------------------------------------------------
# (1) the samples follow the requested distribution, and the test could tell otherwise


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("temperature", "top_p"), SETTINGS)
@pytest.mark.parametrize("engine", ["hf", "hf-compact"])
def test_samples_follow_the_requested_distribution(sampled, arch, temperature, top_p, engine):
    s = sampled(arch, temperature, top_p, engine)
    fields = instruct_defaults(arch)
    for t in range(STEPS):
        alive = torch.tensor([len(g.response_ids) > t for g in s.gens])  # (B,) not ended by EOS before t
        tokens = s.ids[alive, s.prompt_len + t]  # (n,)
        logits = s.logits[alive, t]  # (n, V)
        assert len(tokens) > N // 2
        p = gof_pvalue(tokens, requested(logits, temperature, top_p))
        assert p > ALPHA, (arch, temperature, top_p, t, p)
        if t == 0:  # power, on the same samples: the checkpoint's distribution and a 25% temperature error
            ck = checkpoint_distribution(s.ids[alive, : s.prompt_len + t], logits, fields)
            assert gof_pvalue(tokens, ck) < ALPHA
            assert (
                gof_pvalue(tokens, requested(logits, temperature, top_p, dist_temperature=1.25 * temperature))
                < ALPHA
            )


# --------------------------------------------------------------------------------------------------
# (2) the stored log-probs are those of the distribution sampled from


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("temperature", "top_p"), SETTINGS)
@pytest.mark.parametrize("engine", ["hf", "hf-compact"])
def test_recorded_logprobs_equal_the_forward(sampled, arch, temperature, top_p, engine):
    s = sampled(arch, temperature, top_p, engine)
    ref = requested(s.logits, temperature, top_p).log()  # (B, T, V)
    resp = s.ids[:, s.prompt_len :]  # (B, T)
    want = ref.gather(-1, resp.unsqueeze(-1)).squeeze(-1)  # (B, T)
    n_tokens = 0
    for i, g in enumerate(s.gens):
        got = torch.tensor(g.logprobs)
        assert len(got) == len(g.response_ids)
        torch.testing.assert_close(got, want[i, : len(got)], rtol=0, atol=1e-5)
        n_tokens += len(got)
    assert n_tokens > 2 * N


# --------------------------------------------------------------------------------------------------
# (3) no field of the checkpoint's config reaches generate


def _spy_generate(monkeypatch, model: PreTrainedModel) -> dict[str, list]:
    """Capture the merged config, logits processors and stopping criteria transformers builds for
    ``model``."""
    seen: dict[str, list] = {"config": [], "processors": [], "criteria": []}
    cls = type(model)
    for name, key in (("_prepare_generation_config", "config"), ("_get_logits_processor", "processors"),
                      ("_get_stopping_criteria", "criteria")):
        original = getattr(cls, name)

        def spy(self, *a, _original=original, _key=key, **k):
            out = _original(self, *a, **k)
            if self is model:
                seen[_key].append(out[0] if _key == "config" else list(out))
            return out

        monkeypatch.setattr(cls, name, spy)
    return seen


def _repeats_a_bigram(seq: list[int]) -> bool:
    pairs = list(zip(seq, seq[1:]))
    return len(pairs) != len(set(pairs))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_checkpoint_fields_never_reach_generate(monkeypatch, hostile, arch):
    model = hostile[arch]
    on_disk = model.generation_config
    seen = _spy_generate(monkeypatch, model)
    prompts = _prompts()
    kw = dict(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    got = HFEngine(model, TOK).generate(prompts, 16, **kw)
    assert model.generation_config is on_disk  # restored
    want = HFEngine(_neutral_twin(model), TOK).generate(prompts, 16, **kw)
    # bitwise the samples and log-probs of a model without the checkpoint's config, same seed
    assert [[(g.response_ids, g.logprobs, g.finished) for g in gs] for gs in got] == [
        [(g.response_ids, g.logprobs, g.finished) for g in gs] for gs in want]
    # ... which the checkpoint's fields would have changed (the comparison has power)
    full = [g.prompt_ids + g.response_ids for gs in got for g in gs]
    assert any(_repeats_a_bigram(s) for s in full)  # no_repeat_ngram_size=2 forbids these
    assert any(t in (7, 8) for s in full for t in s[len(prompts[0]) :])  # bad_words_ids / suppress_tokens
    assert max(len(g.response_ids) for gs in got for g in gs) == 12  # max_new_tokens=2, max_time
    # the only processors: our temperature and top-p warpers, then the recorder
    assert [[type(p) for p in ps] for ps in seen["processors"]] == [
        [TemperatureLogitsWarper, TopPLogitsWarper, _ChosenTokenLogprobs]]
    # the only stopping criteria: max length and the tokenizer's EOS (not the checkpoint's EOS ids)
    (criteria,) = seen["criteria"]
    assert [type(c) for c in criteria] == [MaxLengthCriteria, EosTokenCriteria]
    assert criteria[1].eos_token_id.tolist() == [EOS]
    # field by field: ours where we set it, else transformers' global default; never the checkpoint's
    (merged,) = seen["config"]
    ours = neutral_generation_config(max_new_tokens=12, greedy=False, pad_token_id=PAD, eos_token_id=EOS,
                                     bos_token_id=TOK.bos_token_id).to_dict()
    defaults = GenerationConfig._get_default_generation_params()
    for key in {**instruct_defaults(arch), **HOSTILE}:
        if key in ("max_length", "min_length", "custom_entry"):
            continue
        want_value = ours[key] if ours.get(key) is not None else defaults.get(key)
        assert getattr(merged, key) == want_value, key
    assert merged.min_length == 0 and not hasattr(merged, "custom_entry")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_stays_greedy(monkeypatch, hostile, arch):
    model = hostile[arch]
    seen = _spy_generate(monkeypatch, model)
    gens = [
        g for gs in HFEngine(model, TOK).generate(_prompts(), 2, max_new_tokens=10, greedy=True) for g in gs
    ]
    assert [[type(p) for p in ps] for ps in seen["processors"]] == [[_ChosenTokenLogprobs]]
    logits, ids, plen = _forward_logits(model, gens)  # (B, T, V)
    for i, g in enumerate(gens):
        T = len(g.response_ids)
        assert g.response_ids == logits[i, :T].argmax(-1).tolist()  # every token the forward's argmax
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.log_softmax(logits[i, :T], -1).gather(
            -1, ids[i, plen : plen + T, None]).squeeze(-1), rtol=0, atol=1e-5)
    want = [
        g
        for gs in HFEngine(_neutral_twin(model), TOK).generate(_prompts(), 2, max_new_tokens=10, greedy=True)
        for g in gs
    ]
    assert [g.response_ids for g in gens] == [g.response_ids for g in want]
    assert any(_repeats_a_bigram(g.prompt_ids + g.response_ids) for g in gens)  # what no_repeat_ngram forbids


# --------------------------------------------------------------------------------------------------
# wrappers and errors


def test_lora_wrapped_policy_ignores_checkpoint_defaults(monkeypatch, hostile):
    base = copy.deepcopy(hostile["qwen2"])  # peft injects its layers into the module it wraps
    on_disk = base.generation_config
    policy = apply_lora(base, r=4, alpha=8)
    seen = _spy_generate(monkeypatch, base)
    engine = HFEngine(policy, TOK)
    gens = engine.generate(_prompts(), 4, max_new_tokens=6, temperature=0.7, top_p=0.9, seed=1)
    # peft reads the inner one
    assert base.generation_config is on_disk and policy.generation_config is on_disk
    # a config set on the wrapper itself: peft's generate copies it onto the inner model
    on_wrapper = policy.generation_config = GenerationConfig(**{**instruct_defaults("qwen2"), **HOSTILE})
    gens += engine.generate(_prompts(), 4, max_new_tokens=6, temperature=0.7, top_p=0.9, seed=1)
    assert base.generation_config is on_disk and policy.generation_config is on_wrapper
    assert [[type(p) for p in ps] for ps in seen["processors"]] == 2 * [
        [TemperatureLogitsWarper, TopPLogitsWarper, _ChosenTokenLogprobs]]
    assert all(len(g.response_ids) == 6 or g.finished for gs in gens for g in gs)


def test_generation_config_restored_when_generate_fails(hostile):
    model = hostile["llama"]
    on_disk = model.generation_config
    cfg = neutral_generation_config(max_new_tokens=3, greedy=True, pad_token_id=PAD, eos_token_id=EOS)
    with pytest.raises(RuntimeError, match="boom"), checkpoint_defaults_off(model, cfg):
        assert model.generation_config.top_p == 1.0 and model.generation_config.repetition_penalty == 1.0
        raise RuntimeError("boom")
    assert model.generation_config is on_disk and on_disk.top_p == 0.9
