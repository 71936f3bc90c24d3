"""Shared-prefix log-probs equal the packed forward (values and gradients), and the micro-batch planner."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from dphrl.batching import pack, response_logprobs
from dphrl.data.tokenizer import build_char_tokenizer
from dphrl.prefix import (
    _by_length_plan,
    _whole_group_plan,
    can_share_prefix,
    group_by_prompt,
    micro_batch_cost,
    micro_batch_order,
    pack_groups,
    plan_cost,
    plan_micro_batches,
    prefix_response_logprobs,
)
from dphrl.testing import tiny_causal_lm

TOK = build_char_tokenizer("0123456789+abcdefghij")
EOS = TOK.eos_token_id


def _model(arch: str) -> torch.nn.Module:
    model = tiny_causal_lm(TOK, arch=arch, hidden=32, layers=2, seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)  # sharper logits: top-p truncates, gradients are not tiny
    return model


def _groups(seed: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    """Groups of 3, 1 and 5 responses; prompts of 9, 14 and 5 tokens; responses of 1-9 tokens, some
    ending in EOS (and EOS as the pad id below: padding is told apart by position, not by id)."""
    g = random.Random(seed)
    out = []
    for plen, n in [(9, 3), (14, 1), (5, 5)]:
        prompt = [g.randrange(6, len(TOK)) for _ in range(plen)]
        rs = []
        for j in range(n):
            r = [g.randrange(6, len(TOK)) for _ in range(g.randint(1, 8))]
            rs.append(r + [EOS] if j % 2 == 0 else r)
        out.append((prompt, rs))
    return out


def _flat(groups):
    return [p for p, rs in groups for _ in rs], [r for _, rs in groups for r in rs]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    ("temperature", "top_p", "entropy_grad"), [(1.0, 1.0, False), (0.7, 1.0, True), (0.7, 0.9, False)]
)
def test_logprobs_and_gradients_equal_the_packed_forward(arch, temperature, top_p, entropy_grad):
    model = _model(arch)
    groups = _groups()
    prompts, responses = _flat(groups)
    packed = pack(prompts, responses, EOS)
    shared = pack_groups(prompts, responses, EOS)
    assert shared.prompt_ids.shape[0] == 3 and torch.equal(shared.resp_mask, packed.resp_mask)
    mask = packed.resp_mask.bool()  # (B, T)
    w = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))  # (B, T) a loss weight per token

    def loss(logp, ent):  # tokens outside the top-p nucleus (log-prob -inf) are left out
        keep = mask & torch.isfinite(logp)  # (B, T)
        return torch.where(keep, logp * w + ent * (w > 0), torch.zeros_like(logp)).sum()

    want, want_ent = response_logprobs(
        model, packed, temperature, with_entropy=True, entropy_grad=entropy_grad, top_p=top_p
    )
    loss(want, want_ent).backward()
    want_g = _grads(model)
    got, got_ent = prefix_response_logprobs(
        model, shared, temperature, with_entropy=True, entropy_grad=entropy_grad, top_p=top_p
    )
    loss(got, got_ent).backward()
    got_g = _grads(model)

    assert got.shape == want.shape == mask.shape
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)  # -inf where want is -inf
    torch.testing.assert_close(got_ent[mask], want_ent[mask], rtol=0, atol=1e-5)
    assert int(torch.isfinite(want[mask]).sum()) >= 20
    for k in want_g:
        assert torch.isfinite(want_g[k]).all(), k
        torch.testing.assert_close(got_g[k], want_g[k], rtol=0, atol=1e-5, msg=k)
    # the gradients are not trivially equal: the prompt projections get a real gradient
    assert want_g["model.layers.0.self_attn.k_proj.weight"].abs().max() > 1e-2


def test_prompt_cache_carries_gradient(monkeypatch):
    """Control: with the prompt's KV detached when copied to the rollouts, the gradients differ
    (so the equality above does check that the prompt forward receives its rollouts' gradient)."""
    model = _model("llama")
    prompts, responses = _flat(_groups())
    packed = pack(prompts, responses, EOS)
    want, _ = response_logprobs(model, packed)
    (want * packed.resp_mask).sum().backward()
    want_g = _grads(model)

    def detached(self, indices):
        self.keys, self.values = self.keys[indices].detach(), self.values[indices].detach()

    monkeypatch.setattr(DynamicLayer, "batch_select_indices", detached)
    got, _ = prefix_response_logprobs(model, pack_groups(prompts, responses, EOS))
    # values: same
    torch.testing.assert_close(got * packed.resp_mask, want * packed.resp_mask, rtol=0, atol=1e-5)
    (got * packed.resp_mask).sum().backward()
    got_g = _grads(model)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert (got_g[k] - want_g[k]).abs().max() > 1e-3


def test_single_group_and_several_groups():
    model = _model("qwen2")
    groups = _groups(seed=5)
    prompts, responses = _flat(groups)
    with torch.no_grad():
        want, _ = response_logprobs(model, pack(prompts, responses, 0))  # (B, T)
        mask = pack(prompts, responses, 0).resp_mask
        got, ent = prefix_response_logprobs(model, pack_groups(prompts, responses, 0), with_entropy=True)
        torch.testing.assert_close(got * mask, want * mask, rtol=0, atol=1e-5)
        assert ent is not None and ent.shape == got.shape
        row = 0
        for prompt, rs in groups:
            one, none = prefix_response_logprobs(model, pack_groups([prompt] * len(rs), rs, 0))  # one group
            T = max(len(r) for r in rs)
            assert one.shape == (len(rs), T) and none is None
            sub = mask[row : row + len(rs), :T]
            torch.testing.assert_close(one * sub, want[row : row + len(rs), :T] * sub, rtol=0, atol=1e-5)
            row += len(rs)


class _Wrapper(torch.nn.Module):
    """Like DDP / FSDP1: the model under ``.module``, no ``config`` of its own."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_wrapped_model():
    model = _model("llama")
    prompts, responses = _flat(_groups(seed=2))
    with torch.no_grad():
        want, _ = prefix_response_logprobs(model, pack_groups(prompts, responses, 0))
        got, _ = prefix_response_logprobs(_Wrapper(model), pack_groups(prompts, responses, 0))
    assert torch.equal(got, want)


def _spy_forward(model: torch.nn.Module) -> list[dict]:
    """The keyword arguments of every forward call of ``model``."""
    calls: list[dict] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(dict(kw)), with_kwargs=True)
    return calls


def test_attention_mask_and_position_ids():
    model = _model("llama")
    prompts = [[7, 8, 9], [7, 8, 9], [10, 11, 12, 13, 14], [7, 8, 9]]  # rows 0, 1, 3 share a prompt
    responses = [[15, 16, EOS], [17], [18, 19], [20, 21, 22, 23]]
    calls = _spy_forward(model)
    prefix_response_logprobs(model, pack_groups(prompts, responses, 0))
    first, second = calls
    # 1. the distinct prompts, left-padded, positions counting real tokens
    assert first["input_ids"].tolist() == [[0, 0, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert first["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert first["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    # 2. responses but their last token, right-padded; mask = own prompt's mask + own response's
    assert second["input_ids"].tolist() == [[15, 16, EOS], [17, 0, 0], [18, 19, 0], [20, 21, 22]]
    assert second["attention_mask"].tolist() == [
        [0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 1, 1],
    ]
    # positions continue after the prompt's real length (3 or 5)
    assert second["position_ids"].tolist() == [[3, 4, 5], [3, 4, 5], [5, 6, 7], [3, 4, 5]]
    assert second["cache"].get_seq_length() == 5 + 3 and second["cache"].layers[0].keys.shape[0] == 4


def test_one_token_responses_still_run_two_forwards():
    model = _model("llama")
    prompts, responses = [[7, 8], [7, 8], [9]], [[EOS], [10], [11]]
    calls = _spy_forward(model)
    got, _ = prefix_response_logprobs(model, pack_groups(prompts, responses, 0))
    assert len(calls) == 2  # the same number of (sharded: collective) forwards whatever the lengths
    want, _ = response_logprobs(model, pack(prompts, responses, 0))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_gradient_checkpointing_is_refused():
    model = _model("llama")
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(RuntimeError, match="did not fill the KV cache"):
        prefix_response_logprobs(model, pack_groups([[7, 8, 9]] * 2, [[10, 11], [12]], 0))


def test_sliding_window_models_are_refused():
    from transformers import AutoModelForCausalLM, MistralConfig

    model = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, sliding_window=4))
    with pytest.raises(ValueError, match="full attention"):
        prefix_response_logprobs(model, pack_groups([[7, 8, 9]], [[10]], 0))


def test_pack_groups_validates():
    with pytest.raises(ValueError, match="2 prompts but 1"):
        pack_groups([[1], [1]], [[2]], 0)
    with pytest.raises(ValueError, match="empty prompt"):
        pack_groups([[]], [[2]], 0)
    with pytest.raises(ValueError, match="resp_len"):
        pack_groups([[1]], [[2, 3]], 0, resp_len=1)


# --------------------------------------------------------------------------------------------------
# micro-batch planning


def _check_plan(groups, plan, max_seqs):
    seen = sorted((g, i) for mb in plan for g, ix in mb for i in ix)
    assert seen == sorted((g, i) for g, (_, rl) in enumerate(groups) for i in range(len(rl)))  # each once
    for mb in plan:
        assert mb and all(ix for _, ix in mb)
        assert sum(len(ix) for _, ix in mb) <= max_seqs


def test_plan_keeps_groups_whole_and_sorts_by_length():
    groups = [(10, [3, 9, 4]), (12, [20, 2]), (8, [5, 5, 5]), (10, [1])]
    plan = plan_micro_batches(groups, max_seqs=5)
    _check_plan(groups, plan, max_seqs=5)
    # whole groups, longest response first, and each group's sequences longest first
    assert plan == [[(1, [0, 1]), (0, [1, 2, 0])], [(2, [0, 1, 2]), (3, [0])]]


def test_plan_splits_only_groups_that_cannot_fit():
    groups = [(4, [1, 2, 3, 4, 5, 6, 7]), (4, [2, 2])]
    plan = plan_micro_batches(groups, max_seqs=3)
    _check_plan(groups, plan, max_seqs=3)
    assert plan == [[(0, [6, 5, 4])], [(0, [3, 2, 1])], [(0, [0]), (1, [0, 1])]]


def test_micro_batch_cost_counts_each_prompt_once():
    # shared cost: the prompt counted once per micro-batch
    assert micro_batch_cost([100], [10] * 8) == 180
    assert micro_batch_cost([100, 50], [10, 40]) == 2 * 100 + 2 * 40


def test_plan_by_length_when_lengths_spread_within_groups():
    """A real model's groups (SmolLM2, 128 new tokens): 1-2 responses per group cut at 128, the rest
    short. Whole groups make every micro-batch 128 wide; sorting by length pads far less."""
    rng = random.Random(1)
    groups = [(37, [128] * rng.randint(1, 2) + [rng.randint(5, 60) for _ in range(6)]) for _ in range(8)]
    plan = plan_micro_batches(groups, max_seqs=16)
    _check_plan(groups, plan, max_seqs=16)
    whole, by_length = _whole_group_plan(groups, 16), _by_length_plan(groups, 16)
    assert plan == by_length and plan_cost(groups, by_length) < 0.75 * plan_cost(groups, whole)
    assert len(plan) == 4  # 64 sequences: as many micro-batches as before
    widths = [max(groups[g][1][i] for g, ix in mb for i in ix) for mb in plan]
    assert widths[0] == 128 and widths == sorted(widths, reverse=True) and widths[-1] < 40
    for mb in plan:  # a group appears once per micro-batch
        assert len({g for g, _ in mb}) == len(mb)


def test_plan_is_never_costlier_than_whole_groups():
    rng = random.Random(2)
    for _ in range(50):
        groups = [(rng.randint(1, 50), [rng.randint(1, 30) for _ in range(rng.randint(1, 9))])
                  for _ in range(rng.randint(1, 12))]
        k = rng.choice([1, 3, 8, 16])
        plan = plan_micro_batches(groups, max_seqs=k)
        assert plan_cost(groups, plan) <= plan_cost(groups, _whole_group_plan(groups, k))
        assert plan_cost(groups, plan) <= plan_cost(groups, _by_length_plan(groups, k))


def test_plan_random_invariants_and_less_padding_than_sequential_chunks():
    rng = random.Random(0)
    for _ in range(30):
        groups = [(rng.randint(1, 50), [rng.randint(1, 30) for _ in range(rng.randint(1, 9))])
                  for _ in range(rng.randint(1, 12))]
        max_seqs = rng.choice([1, 4, 8, 16])
        _check_plan(groups, plan_micro_batches(groups, max_seqs=max_seqs), max_seqs=max_seqs)
    # 16 groups of 8 with spread lengths, shuffled sequences cut into chunks of 16 (the trainer today)
    # vs the plan
    groups = [(rng.randint(10, 20), [rng.randint(1, 32) for _ in range(8)]) for _ in range(16)]
    seqs = [(g, i) for g in range(16) for i in range(8)]
    rng.shuffle(seqs)
    chunks = [seqs[i : i + 16] for i in range(0, 128, 16)]
    packed = sum(
        len(c) * (max(groups[g][0] for g, _ in c) + max(groups[g][1][i] for g, i in c)) for c in chunks
    )
    plan = plan_micro_batches(groups, max_seqs=16)
    shared = sum(
        micro_batch_cost([groups[g][0] for g, _ in mb], [groups[g][1][i] for g, ix in mb for i in ix])
        for mb in plan
    )
    assert len(plan) == 8 and shared < 0.7 * packed


def test_micro_batch_order_groups_scattered_prompts():
    prompts = [[1, 2], [3], [1, 2], [4, 5, 6], [3], [1, 2]]
    responses = [[1], [1, 2, 3], [1, 2], [1], [1], [1, 2, 3, 4]]
    assert group_by_prompt(prompts) == [[0, 2, 5], [1, 4], [3]]
    order = micro_batch_order(prompts, responses, max_seqs=3)
    # by length (cost 16 + 12) beats whole groups ([[5, 2, 0], [1, 4, 3]]: 14 + 15); a group's
    # sequences stay contiguous inside a micro-batch
    assert order == [[5, 2, 1], [3, 0, 4]]
    with pytest.raises(ValueError, match="max_seqs must be >= 1"):
        micro_batch_order(prompts, responses, max_seqs=0)


def test_one_token_backward_runs_through_both_forwards():
    """A batch of 1-token responses (e.g. a padding micro-batch) still back-propagates through the response
    forward: the backward collectives of a sharded model (FSDP2) match a rank with longer responses."""
    model = _model("llama")
    seen: list[int] = []
    model.model.layers[0].register_full_backward_hook(lambda *_: seen.append(1))
    logp, _ = prefix_response_logprobs(model, pack_groups([[7, 8]], [[EOS]], 0))  # (1, 1)
    logp.sum().backward()
    assert len(seen) == 2  # the layer's backward ran for the prompt forward and the response forward


def _trainer_grads(tmp_path, share: bool, **kw) -> tuple[object, dict[str, torch.Tensor]]:
    import _ddp_worker as base

    from dphrl.config import TrainConfig
    from dphrl.trainer import Trainer

    store = tmp_path / "store"
    if not store.exists():
        base.make_store(store)
    tok = base.tokenizer()
    cfg = TrainConfig(model=base.MODEL_NAME, algorithm="dph", reward="ddp_toy", reference_store=str(store),
                      divergence="js", eta=0.5, prompts_per_step=base.GROUPS, rollout_n=base.GROUP_SIZE,
                      max_new_tokens=5, micro_batch_size=4, lr=1e-3, max_grad_norm=0.0, progress=False,
                      output_dir=str(tmp_path / f"run-{share}"), share_prefix=share, **kw)
    tr = Trainer(cfg, model=base.model(tok), tokenizer=tok, examples=base.examples())
    rolls, refs = base.global_batch(tok, base.model(tok))
    tr.optimizer_step(rolls, refs)
    return tr, {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def test_trainer_update_equals_the_packed_update(tmp_path):
    """The trainer's shared-prefix update (micro-batches of whole groups) gives the packed update's
    gradients (rollout loss + rehearsal term), and the stored-log-prob forward agrees too."""
    shared, g_shared = _trainer_grads(tmp_path, True)
    packed, g_packed = _trainer_grads(tmp_path, False)
    assert shared.share_prefix and not packed.share_prefix
    assert shared.run_info()["share_prefix_update"] is True
    assert g_shared.keys() == g_packed.keys() and len(g_shared) > 0
    assert max(g.abs().max().item() for g in g_packed.values()) > 1e-3  # a real gradient, not zeros
    for n, g in g_packed.items():
        torch.testing.assert_close(g_shared[n], g, rtol=1e-4, atol=1e-6, msg=n)
    import _ddp_worker as base

    rolls, _ = base.global_batch(base.tokenizer(), base.model(base.tokenizer()))
    a = shared.updater.no_grad_logprobs(shared.model, rolls)
    b = packed.updater.no_grad_logprobs(shared.model, rolls)  # same weights, the packed layout
    assert [len(x) for x in a] == [len(s.response_ids) for s in rolls]  # back in the input order
    torch.testing.assert_close(torch.tensor(sum(a, [])), torch.tensor(sum(b, [])), rtol=0, atol=1e-5)


def test_trainer_falls_back_to_packed_with_gradient_checkpointing(tmp_path):
    tr, _ = _trainer_grads(tmp_path, True, gradient_checkpointing=True)
    assert tr.share_prefix is False and tr.run_info()["share_prefix_update"] is False


def test_can_share_prefix_detects_checkpointing_already_on():
    model = _model("llama")
    assert can_share_prefix(model)
    model.gradient_checkpointing_enable()
    assert not can_share_prefix(model)  # on in the model, not only in the config flag
