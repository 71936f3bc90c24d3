"""DPH-RL on TRL (``dphrl.integrations.trl``): the added term is dphrl's, exactly scaled, and nothing else.

(a) the term equals dphrl's own ``Updater.reference_loss`` on the same samples (loss and gradients,
    fp32, atol 1e-6), and a full TRL optimizer step with 1 or 3 accumulation micro-steps (and 2
    processes, (d)) gives its gradient; the reference stream is dphrl's ``PromptSampler``;
(b) a 20-step run on the toy task raises the reward; the term keeps the policy near pi_ref;
(c) no reference model is created or copied (also with LoRA);
(d) 2 processes (torchrun, gloo) give the 1-process gradient;
(e) the refusals: beta != 0, use_liger_loss, temperature, tokenizer, weights, store contents, TRL hooks.
"""

from __future__ import annotations

import gc
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import _trl_worker as w
import pytest
import torch

pytest.importorskip("trl")

from transformers import PreTrainedModel  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from dphrl.batching import pack  # noqa: E402
from dphrl.config import TrainConfig  # noqa: E402
from dphrl.data.chat import encode_prompt  # noqa: E402
from dphrl.integrations import trl as dtrl  # noqa: E402
from dphrl.integrations.trl import (  # noqa: E402
    DPHGRPOTrainer,
    UnsupportedTRLSetupError,
    plan_reference_slices,
    trl_dataset,
    trl_reward,
)
from dphrl.reference import ReferenceStore, StoreMismatchError  # noqa: E402
from dphrl.testing import tiny_causal_lm
from dphrl.trainer import PromptSampler, Seq  # noqa: E402
from dphrl.update import Updater  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
GRAD_ATOL = 1e-6  # fp32: TRL's chunked fused LM head vs dphrl's full-logits log-softmax, summation order only


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trl") / "store"
    manifest = w.make_store(path)
    assert manifest["counts"]["d_pef"] == len(w.KEEP) and manifest["counts"]["d_exp"] == 6, manifest["counts"]
    return path


def grpo_args(tmp: Path, **kw) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        num_generations=8,
        max_completion_length=3,
        max_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        top_k=0,
        seed=0,
        gradient_checkpointing=False,
        log_level="error",
    )
    base.update(kw)
    return GRPOConfig(**base)


def make_trainer(
    store, tmp: Path, net=None, args: GRPOConfig | None = None, tok=None, **kw
) -> DPHGRPOTrainer:
    tok = tok or w.tokenizer()
    return DPHGRPOTrainer(
        net if net is not None else w.model(tok),
        trl_reward("trl_toy"),
        args or grpo_args(tmp),
        trl_dataset(w.examples(), store),
        processing_class=tok,
        reference_store=store,
        **kw,
    )


def dphrl_reference_term(store_dir: Path, samples, net, divergence: str, params: dict, eta: float):
    """dphrl's own Updater.reference_loss on ``samples`` (one micro-batch, normalized by their tokens)."""
    cfg = TrainConfig(model=w.MODEL_NAME, algorithm="dph", reward="trl_toy", reference_store=str(store_dir),
                      divergence=divergence, divergence_params=params, eta=eta)
    seqs = [Seq(s.prompt_ids, s.response_ids, ref_logp=s.ref_logprobs) for s in samples]
    batch = pack([s.prompt_ids for s in seqs], [s.response_ids for s in seqs], w.tokenizer().pad_token_id)
    n_tok = float(sum(len(s.response_ids) for s in seqs))
    loss, _ = Updater.reference_loss(SimpleNamespace(cfg=cfg, model=net), batch, seqs, n_tok)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in net.named_parameters()}


def assert_grads_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 1e-3, f"{what}: degenerate test, the expected gradient is ~0"
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, atol=GRAD_ATOL, rtol=1e-5, msg=f"{what}: gradient of {n}")


# ------------------------------------------------------------------------------------------------ (a)
@pytest.mark.parametrize("divergence,params", [("forward_kl", {}), ("js", {}), ("alpha", {"alpha": 0.5})])
def test_reference_term_equals_dphrl_trainer_term(store_dir, tmp_path, divergence, params):
    """Same samples, same weights: TRL-side loss and gradients == dphrl's Updater.reference_loss (1e-6)."""
    trainer = make_trainer(store_dir, tmp_path, divergence=divergence, divergence_params=params, eta=0.7,
                           ref_prompts_per_step=4)
    w.perturb(trainer.model)
    samples = trainer.reference_batch(0)
    assert len(samples) >= 8
    n_tok = float(sum(len(s.response_ids) for s in samples))
    total = torch.zeros(())
    for items in plan_reference_slices(samples, 0, 1, 3):  # spread over 3 micro-steps, as compute_loss does
        if items:
            loss, _ = trainer.reference_loss(trainer.model, items, n_tok)
            loss.backward()
            total = total + loss.detach()
    got = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}

    net = w.model(w.tokenizer())
    w.perturb(net)
    want_loss, want = dphrl_reference_term(store_dir, samples, net, divergence, params, 0.7)
    assert want_loss.item() > 1e-3
    assert total.item() == pytest.approx(want_loss.item(), abs=1e-6)
    assert_grads_close(got, want, divergence)


def test_reference_stream_is_dphrl_prompt_sampler():
    """Optimizer step w rehearses the prompts of dphrl's PromptSampler's (w+1)-th draw; jumps replay it."""
    sampler = PromptSampler(7, 11)
    expected = [sampler.next(3) for _ in range(8)]
    stream = dtrl._ReferenceStream(7, 3, 11)
    assert [stream.indices(i) for i in range(8)] == expected
    assert stream.indices(5) == expected[5]  # a resumed run (step counter jumps back)
    assert dtrl._ReferenceStream(7, 3, 11).indices(6) == expected[6]  # or forward


@pytest.mark.parametrize("n", range(0, 10))
def test_plan_reference_slices_even_and_complete(n):
    """Every sample weighted 1 exactly once; every rank runs equally many sequences on the same
    micro-steps."""
    samples = [SimpleNamespace(i=i) for i in range(n)]
    for world, micro, batch in itertools.product((1, 2, 3), (1, 2, 4), (None, 1, 3)):
        case = (world, micro, batch)
        plans = [plan_reference_slices(samples, r, world, micro, batch) for r in range(world)]
        assert all(len(plan) == micro for plan in plans), case
        real = sorted(s.i for plan in plans for sl in plan for s, wt in sl if wt == 1.0)
        assert real == list(range(n)), case
        assert all(wt in (0.0, 1.0) for plan in plans for sl in plan for _, wt in sl), case
        shard = -(-n // world)  # the largest shard
        for m in range(micro):
            sizes = {len(plan[m]) for plan in plans}
            assert len(sizes) == 1, (case, m, sizes)  # same forward shape on every rank
            if sizes != {0}:  # a micro-step with a forward has a real sample on some rank
                assert any(wt == 1.0 for plan in plans for _, wt in plan[m]), (case, m)
                assert sizes.pop() == max(-(-shard // micro), min(shard, batch or 0)), (case, m)


@pytest.mark.parametrize("ga,loss_type,ref_batch,sizes", [
    (1, "grpo", None, [13]), (3, "dapo", None, [5, 5, 5]), (3, "bnpo", 8, [8, 8]),
])
def test_optimizer_step_gradient_is_exactly_the_global_token_mean(
    store_dir, tmp_path, ga, loss_type, ref_batch, sizes
):
    """A real TRL step (zero reward: TRL's own gradient is 0) accumulates exactly dphrl's term on the
    batch."""
    res = w.one_step(store_dir, tmp_path / "run", ga, loss_type=loss_type, ref_batch_size=ref_batch)
    assert res["world"] == 1 and res["micro_steps"] == ga
    # 13 samples (+ zero-weight padding) over the micro-steps
    assert [len(f) for f in res["forwards"]] == sizes
    assert sum(wt for f in res["forwards"] for wt in f) == 13.0
    store = w.trimmed_store(store_dir)
    samples = [s for pid in store.pef_ids for s in store.samples[pid]]
    net = w.model(w.tokenizer())
    w.perturb(net)
    _, want = dphrl_reference_term(store_dir, samples, net, w.DIVERGENCE, {}, w.ETA)
    assert_grads_close(res["grads"], want, f"ga={ga}")
    (log,) = res["logs"]
    assert log["dph/ref_tokens"] == sum(len(s.response_ids) for s in samples)
    assert log["dph/ref_sequences"] == 13


# ------------------------------------------------------------------------------------------------ (d)
def test_two_processes_give_the_one_process_gradient(store_dir, tmp_path):
    """torchrun x2 (gloo), 1 and 2 micro-steps (2 with gradient checkpointing): same gradient as 1 process."""
    from _shared import run_two_processes

    out = tmp_path / "ddp"
    out.mkdir()
    run_two_processes(
        ROOT / "tests" / "_trl_worker.py", [str(store_dir), str(out)], out, "started_rank*", timeout=240
    )
    store = w.trimmed_store(store_dir)
    samples = [s for pid in store.pef_ids for s in store.samples[pid]]
    net = w.model(w.tokenizer())
    w.perturb(net)
    _, want = dphrl_reference_term(store_dir, samples, net, w.DIVERGENCE, {}, w.ETA)
    for ga in (1, 2):
        r0 = torch.load(out / f"rank0_ga{ga}.pt", weights_only=False)
        r1 = torch.load(out / f"rank1_ga{ga}.pt", weights_only=False)
        assert r0["world"] == r1["world"] == 2 and r0["ref_model_is_none"]
        # even sharding: the same forwards (count and size) on both ranks, 13 real samples in all
        assert [len(f) for f in r0["forwards"]] == [len(f) for f in r1["forwards"]]
        assert sum(wt for r in (r0, r1) for f in r["forwards"] for wt in f) == 13.0
        assert_grads_close(r0["grads"], want, f"2 processes, ga={ga}")
        for n, g in r0["grads"].items():
            assert torch.equal(g, r1["grads"][n]), f"ranks disagree on {n}"
        assert r0["logs"][0]["dph/ref_tokens"] == sum(len(s.response_ids) for s in samples)


# ------------------------------------------------------------------------------------------------ (b)
def _p_first_seven(net, tok) -> float:
    """Exact mean probability that the response starts with '7' on the D_exp prompts (the reward)."""
    seven = tok.convert_tokens_to_ids("7")
    ps = []
    with torch.no_grad():
        for ex in w.examples():
            if ex.answer == "7":
                ids = torch.tensor([encode_prompt(tok, ex.prompt)])
                ps.append(torch.softmax(net(input_ids=ids).logits[0, -1].float(), -1)[seven].item())
    return sum(ps) / len(ps)


def test_toy_run_raises_reward(store_dir, tmp_path):
    """20 steps of DPH-JS (eta 0.2) on the toy task: P(correct) and the logged reward rise;
    the term is logged."""
    tok = w.tokenizer()
    trainer = make_trainer(
        store_dir, tmp_path, tok=tok, args=grpo_args(tmp_path, max_steps=20), divergence="js"
    )
    before = _p_first_seven(trainer.model, tok)
    trainer.train()
    after = _p_first_seven(trainer.model, tok)
    assert before < 0.1 and after > 0.5, (before, after)  # measured: 0.059 -> 0.87
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 20 and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards
    divs = [h["dph/div"] for h in trainer.state.log_history if "dph/div" in h]
    assert len(divs) == 20 and all(d >= 0 for d in divs) and divs[-1] > 0


def test_rehearsal_keeps_policy_near_reference(store_dir, tmp_path):
    """The added term works: with eta = 1 the divergence on D_pef samples stays far below eta = 0's."""
    final = {}
    for eta in (0.0, 1.0):
        trainer = make_trainer(
            store_dir,
            tmp_path / str(eta),
            args=grpo_args(tmp_path / str(eta), max_steps=20),
            divergence="js",
            eta=eta,
        )
        trainer.train()
        divs = [h["dph/div"] for h in trainer.state.log_history if "dph/div" in h]
        final[eta] = sum(divs[-5:]) / 5
    assert final[1.0] < 0.5 * final[0.0], final  # measured: ~0.2 vs ~1.1


# ------------------------------------------------------------------------------------------------ (c)
def _other_copies(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """Live models, other than ``policy``, holding the same weights (a reference copy would be one)."""
    gc.collect()
    mine = {n: p.detach() for n, p in policy.named_parameters()}
    out = []
    for o in gc.get_objects():
        if issubclass(type(o), PreTrainedModel) and o is not policy:
            theirs = dict(o.named_parameters())
            if theirs.keys() == mine.keys() and all(
                torch.equal(theirs[k].detach(), v) for k, v in mine.items()
            ):
                out.append(o)
    return out


def test_no_reference_model_is_ever_loaded(store_dir, tmp_path, monkeypatch):
    """TRL only builds ref_model when beta != 0: nothing calls its model loader,
    no copy of the weights lives."""
    import trl.trainer.grpo_trainer as grpo_mod

    def no_loading(*a, **k):
        raise AssertionError("a second model was loaded")

    monkeypatch.setattr(grpo_mod, "create_model_from_path", no_loading)
    trainer = make_trainer(store_dir, tmp_path, args=grpo_args(tmp_path, max_steps=2))
    assert trainer.ref_model is None and trainer.beta == 0.0
    assert _other_copies(trainer.model) == []
    trainer.train()
    assert trainer.ref_model is None
    assert _other_copies(trainer.model) == []
    assert [h["dph/ref_sequences"] for h in trainer.state.log_history if "dph/ref_sequences" in h]


def test_lora_trains_with_the_term_and_no_reference(store_dir, tmp_path):
    """With a LoRA adapter (peft_config) the term is added too and no reference model exists."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(store_dir, tmp_path, args=grpo_args(tmp_path, max_steps=2), peft_config=cfg)
    assert trainer.ref_model is None
    trainer.train()
    divs = [h["dph/div"] for h in trainer.state.log_history if "dph/div" in h]
    assert len(divs) == 2 and divs[-1] > 0  # LoRA B starts at 0: step 1 is at pi_ref, step 2 has moved


# ------------------------------------------------------------------------------------------------ (e)
def test_refuses_beta(store_dir, tmp_path, monkeypatch):
    import trl.trainer.grpo_trainer as grpo_mod

    monkeypatch.setattr(
        grpo_mod, "create_model_from_path", lambda *a, **k: pytest.fail("reference model loaded")
    )
    with pytest.raises(UnsupportedTRLSetupError, match=r"beta=0\.0.*beta=0\.04|beta=0\.04.*beta=0\.0"):
        make_trainer(store_dir, tmp_path, args=grpo_args(tmp_path, beta=0.04))


def test_refuses_liger_loss(store_dir, tmp_path):
    args = grpo_args(tmp_path)
    args.use_liger_loss = True  # the field of TRL versions whose Liger path replaces compute_loss
    with pytest.raises(UnsupportedTRLSetupError, match="use_liger_loss=False"):
        make_trainer(store_dir, tmp_path, args=args)


def test_refuses_temperature_mismatch(store_dir, tmp_path):
    with pytest.raises(UnsupportedTRLSetupError, match=r"temperature=0\.7.*1\.0"):
        make_trainer(store_dir, tmp_path, args=grpo_args(tmp_path, temperature=0.7))


def test_refuses_other_tokenizer_weights_or_stored_values(store_dir, tmp_path):
    from dphrl.data.tokenizer import build_char_tokenizer

    other_tok = build_char_tokenizer("0123456789+-")
    with pytest.raises(StoreMismatchError, match="tokenizer_hash"):
        make_trainer(store_dir, tmp_path, net=w.model(other_tok), tok=other_tok)
    tok = w.tokenizer()
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        make_trainer(store_dir, tmp_path, net=tiny_causal_lm(tok, hidden=32, layers=2, heads=4, seed=1))
    # right weights by fingerprint, wrong stored log-probs: the start-up re-scoring refuses the store
    store = ReferenceStore(store_dir)
    for samples in store.samples.values():
        for s in samples:
            s.ref_logprobs = [x - 0.5 for x in s.ref_logprobs]
    with pytest.raises(StoreMismatchError, match="re-scored"):
        make_trainer(store, tmp_path)


def test_refuses_trl_without_the_hooks(store_dir, tmp_path, monkeypatch):
    monkeypatch.delattr(GRPOTrainer, "_compute_loss")
    with pytest.raises(UnsupportedTRLSetupError, match=r"_compute_loss.*trl==1\.16\.0"):
        make_trainer(store_dir, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(GRPOTrainer, "loss_is_scaled_for_ga", None)
    with pytest.raises(UnsupportedTRLSetupError, match="loss_is_scaled_for_ga"):
        make_trainer(store_dir, tmp_path)


# ------------------------------------------------------------------------------------------------ adapters
def test_trl_dataset_keeps_d_exp_and_carries_examples(store_dir):
    store = ReferenceStore(store_dir)
    ds = trl_dataset(w.examples(), store)
    assert sorted(ds["id"]) == sorted(store.exp_ids) and len(ds) == 6
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": row["id"][1:] + "+" + row["id"][1:]}]
    assert row["answer"] == "7" and row["task"] == "trl_toy" and json.loads(row["meta"]) == {}
    assert len(trl_dataset(w.examples())) == 12  # no store: every example
    stranger = w.examples()[:1]
    stranger[0].id = "never-presampled"
    with pytest.raises(StoreMismatchError, match="presampled on other prompts"):
        trl_dataset(stranger, store)


def test_trl_reward_scores_counts_failures_and_logs():
    from dphrl.data.example import Example

    def picky(response: str, ex: Example) -> float:
        if response == "boom":
            raise RuntimeError("reward blew up")
        return float(response[:1] == ex.answer) + (0.5 if ex.meta.get("bonus") else 0.0)

    ds = trl_dataset([Example(id="a", prompt=[{"role": "user", "content": "1+1"}], answer="2", task="x",
                              meta={"bonus": True}),
                      Example(id="b", prompt=[{"role": "user", "content": "2+2"}], answer="4", task="x")])
    rows = [ds[0], ds[1], ds[1]]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    logged: list[tuple[str, float]] = []
    fn = trl_reward(picky)
    completions = [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "4"}],
                   [{"role": "assistant", "content": "boom"}]]
    scores = fn(prompts=[r["prompt"] for r in rows], completions=completions, completion_ids=[[], [], []],
                log_metric=lambda k, v: logged.append((k, v)), **columns)
    assert scores == [1.5, 1.0, 0.0]
    assert fn.failures == 1 and fn.timeouts == 0
    assert ("dphrl/reward_failures", 1.0) in logged
    strict = trl_reward(picky, max_failure_frac=0.2)
    with pytest.raises(RuntimeError, match="1 of 3 evaluations failed"):
        strict(prompts=[r["prompt"] for r in rows], completions=completions, **columns)
    # a registered reward by name, plain-text completions
    assert trl_reward("trl_toy")(prompts=["x"], completions=["7"], answer=["7"], task=["trl_toy"]) == [1.0]
