"""The OSPO trainer: a step trains, token advantages keep their invariants, checkpoints resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

import ospo_fast as of
from ospo_fast.app.evaluation import format_metrics
from ospo_fast.app.tiny import build_tokenizer, tiny_causal_lm
from ospo_fast.app.warm_start import supervised_warm_start
from ospo_fast.credit import completion_offsets
from ospo_fast.data import follows_format
from ospo_fast.trainer import CHECKPOINT, METRICS, OSPOConfig, OSPOTrainer

KEYWORDS = [["red", "running", "shoes"], ["usb", "charger", "cable"]]
PROMPTS = [[{"role": "user", "content": "shoes for a run"}], [{"role": "user", "content": "charge my phone"}]]
TARGETS = ["<think>run</think><answer>red running shoes</answer>",
           "<think>phone</think><answer>usb charger cable</answer>"]


def keyword_reward(texts, owners):
    """Share of the owner's keywords that the text contains, with diminishing returns."""
    return torch.tensor(
        [(sum(w in t.split() for w in KEYWORDS[o]) / len(KEYWORDS[o])) ** 0.5 for t, o in zip(texts, owners)],
        dtype=torch.float64,
    )


@pytest.fixture(scope="module")
def tokenizer():
    corpus = TARGETS * 20 + ["red running shoes for women", "usb c charger cable for iphone", "blue cotton shirt"] * 20
    return build_tokenizer(corpus, vocab_size=400)


@pytest.fixture(scope="module")
def warm_weights(tokenizer):
    """A policy that already writes the answer format, so sampled rewards differ within a group."""
    model = tiny_causal_lm(tokenizer, hidden_size=64)
    supervised_warm_start(model, tokenizer, PROMPTS * 4, TARGETS * 4, steps=40, batch_size=4, learning_rate=3e-3,
                          progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def make_trainer(tokenizer, warm_weights):
    def make(tmp_path, seed=0, answer_metrics=None, **overrides):
        return _make_trainer(tokenizer, warm_weights, tmp_path, seed, answer_metrics, **overrides)

    return make


def _make_trainer(tokenizer, warm_weights, tmp_path, seed=0, answer_metrics=None, **overrides):
    model = tiny_causal_lm(tokenizer, hidden_size=64, seed=seed)
    if seed == 0:
        model.load_state_dict(warm_weights)
    options = dict(output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, group_size=4, max_new_tokens=12,
                   learning_rate=1e-3, save_steps=1, progress=False, seed=seed)
    options.update(overrides)
    return OSPOTrainer(model, tokenizer, keyword_reward, PROMPTS, [0, 1], OSPOConfig(**options),
                       answer_metrics=answer_metrics)


def _rollout(trainer):
    torch.manual_seed(0)
    prompts = trainer._next_prompts()
    return trainer.score(trainer.generate(prompts), prompts)


def test_ospo_step_updates_the_policy(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train()
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_ospo_token_advantages_average_to_the_group_advantage(make_trainer, tmp_path):
    rollout = _rollout(make_trainer(tmp_path, redistribution="rank"))
    mask = rollout.completion_mask.float()
    mean = (rollout.token_advantages * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(mean, rollout.advantages.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("redistribution", ["proportional", "rank", "hybrid", "signed"])
def test_ospo_gives_tokens_outside_the_segments_their_response_advantage(make_trainer, tmp_path, redistribution):
    rollout = _rollout(make_trainer(tmp_path, redistribution=redistribution))
    mask, segments = rollout.completion_mask, rollout.segment_mask
    outside = mask & ~segments
    assert outside.any() and (mask & segments).any()  # tags and EOS, and answer segments, in every batch
    expected = rollout.advantages[:, None].expand_as(mask).float()
    assert torch.equal(rollout.token_advantages[outside], expected[outside])


def test_signed_mode_compares_segments_within_the_group_and_weight_zero_is_grpo(make_trainer, tmp_path):
    signed = _rollout(make_trainer(tmp_path / "signed", redistribution="signed"))
    grpo_like = _rollout(make_trainer(tmp_path / "zero", redistribution="signed", segment_weight=0.0))
    mask = grpo_like.completion_mask
    assert torch.equal(grpo_like.token_advantages, torch.where(mask, grpo_like.advantages[:, None], 0.0))
    segment = signed.segment_mask & signed.completion_mask
    assert segment.any()
    # segment_weight = 1: the segment tokens carry their segments' advantages, not their responses'.
    expected_grpo = signed.advantages[:, None].expand_as(segment)
    assert not torch.equal(signed.token_advantages[segment], expected_grpo[segment])


def test_shuffled_credit_is_a_permutation_of_each_responses_credit(tokenizer):
    # The control of an experiment: the same credit values, moved among a response's segments.
    import numpy as np

    from ospo_fast import OwenAttributor
    from ospo_fast.credit import attribute_completions

    texts = ["red shoes, running, for women, size 8", "usb cable, charger, blue", "red running shoes"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
    attributor = OwenAttributor(keyword_reward, method="exact")
    owen = attribute_completions(tokenizer, ids, attributor, [0, 1, 0])
    shuffled = attribute_completions(tokenizer, ids, attributor, [0, 1, 0], permute=np.random.default_rng(3))
    assert torch.equal(owen.token_player, shuffled.token_player)
    moved = 0
    for r in range(len(texts)):
        player = owen.token_player[r]
        a = [float(owen.credit[r][player == i].sum()) for i in range(int(player.max()) + 1)]
        b = [float(shuffled.credit[r][player == i].sum()) for i in range(int(player.max()) + 1)]
        assert sorted(a) == pytest.approx(sorted(b), abs=1e-6) and sum(a) == pytest.approx(sum(b), abs=1e-6)
        moved += a != pytest.approx(b, abs=1e-6)
    assert moved > 0


def test_trainer_with_shuffled_credit_runs_and_checks_the_option(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, credit="shuffled")
    rollout = _rollout(trainer)
    assert rollout.credit.shape == rollout.token_advantages.shape
    with pytest.raises(ValueError, match="credit: expected one of"):
        make_trainer(tmp_path, credit="random")


def test_metrics_log_the_format_rate_and_completion_length(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, answer_metrics=format_metrics)
    metrics = trainer.train()
    texts = trainer.last_rollout.texts
    assert metrics[-1]["format_rate"] == sum(follows_format(t) for t in texts) / len(texts)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= x["format_rate"] <= 1 and x["completion_length"] > 0 for x in logged)


def test_the_trainer_logs_no_answer_metric_unless_given_one(make_trainer, tmp_path):
    metrics = make_trainer(tmp_path, mode="grpo", max_steps=1).train()
    assert "format_rate" not in metrics[-1] and metrics[-1]["completion_length"] > 0

def test_grpo_mode_gives_every_token_its_response_advantage(make_trainer, tmp_path):
    rollout = _rollout(make_trainer(tmp_path, mode="grpo"))
    mask = rollout.completion_mask
    expected = rollout.advantages[:, None].expand_as(mask) * mask
    torch.testing.assert_close(rollout.token_advantages, expected.float())


def test_sequence_reward_is_the_value_of_all_segments(make_trainer, tmp_path):
    rollout = _rollout(make_trainer(tmp_path))
    segmenter = of.Segmenter()
    answers = [of.coalition_text(sg, [True] * sg.num_players) for sg in map(segmenter, rollout.texts)]
    torch.testing.assert_close(rollout.rewards.double(), keyword_reward(answers, rollout.owners), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("method", ["auto", "sampled"])
def test_resume_continues_exactly_where_it_stopped(make_trainer, tmp_path, method):
    straight = make_trainer(tmp_path / "straight", max_steps=4, attribution_method=method)
    straight.train()
    first = make_trainer(tmp_path / "resumed", max_steps=2, attribution_method=method)
    first.train()
    second = make_trainer(tmp_path / "resumed", max_steps=4, attribution_method=method)
    with torch.no_grad():  # a different initial policy, overwritten by the checkpoint
        for p in second.model.parameters():
            p.add_(1.0)
    second.train(resume=True)
    # The sampled plans' generator continues where it stopped (a fresh one would draw the first orders again).
    assert second.attributor.state_dict() == straight.attributor.state_dict()
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b)
    lines = [json.loads(x) for x in (tmp_path / "resumed" / METRICS).read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "straight" / METRICS).read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert [m["reward"] for m in lines] == [m["reward"] for m in reference]


def test_resume_drops_metrics_logged_after_the_checkpoint(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, save_steps=2)
    trainer.train()
    with open(tmp_path / METRICS, "a") as f:  # a step that ran but crashed before its checkpoint
        f.write(json.dumps({"step": 3, "reward": 0.0}) + "\n")
    resumed = make_trainer(tmp_path, max_steps=3)
    resumed.train(resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)

    def crash(obj, f):
        f.write(b"partial bytes")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    kept = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert kept["step"] == saved["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_without_a_checkpoint_says_so(make_trainer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path).train(resume=True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(mode="ppo"), r"mode: expected one of \('ospo', 'grpo'\)"),
        (dict(redistribution="uniform"), "redistribution: expected one of"),
        (dict(group_size=1), r"group_size: expected an int >= 2 \(GRPO needs at least 2"),
        (dict(max_steps=0), "max_steps: expected a positive int"),
        (dict(learning_rate=0.0), r"learning_rate: expected a finite number in \(0, inf\)"),
    ],
)
def test_bad_config_names_the_field(make_trainer, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **overrides)


def test_prompts_and_owners_must_match(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="owners: expected 2"):
        OSPOTrainer(tiny_causal_lm(tokenizer), tokenizer, keyword_reward, PROMPTS, [0],
                    OSPOConfig(output_dir=str(tmp_path)))


def test_kl_to_a_reference_model_is_reported(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, beta=0.1, max_steps=2)
    metrics = trainer.train()
    assert "kl" in metrics[-1] and metrics[-1]["kl"] >= 0.0


def test_lora_trains_only_the_adapters(make_trainer, tmp_path):
    pytest.importorskip("peft")
    trainer = make_trainer(tmp_path, lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, beta=0.05)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)


def test_warm_start_teaches_the_answer_format(tokenizer):
    model = tiny_causal_lm(tokenizer, hidden_size=64)
    losses = supervised_warm_start(model, tokenizer, PROMPTS * 4, TARGETS * 4, steps=60, batch_size=4,
                                   learning_rate=3e-3, progress=False)
    assert losses[-1] < 0.5 * losses[0]


def test_completion_offsets_cover_the_decoded_text(tokenizer):
    ids = tokenizer("<think>run</think><answer>red running shoes</answer>", add_special_tokens=False)["input_ids"]
    text, spans = completion_offsets(tokenizer, ids + [tokenizer.eos_token_id, tokenizer.pad_token_id])
    assert "".join(text[a:b] for a, b in spans) == text
    assert spans[-2:] == [(0, 0), (0, 0)]


@pytest.mark.gpu
def test_no_host_sync_between_rewards_and_optimizer_step(make_trainer, tmp_path):
    """ospo_fast's own work between the rewards and the optimizer step (the fused loss, its backward, the
    micro-batch weighting, clipping, the step) never waits on the GPU. The policy's forward itself is exempt:
    transformers' SDPA mask preparation asks the host whether a padded batch has padding (one ``.all()``)."""
    trainer = make_trainer(tmp_path)
    trainer.model.cuda()
    trainer.device = torch.device("cuda")
    forward = trainer.model.forward

    def forward_outside_the_check(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    prompts = trainer._next_prompts()
    rollout = trainer.score(trainer.generate(prompts), prompts)
    trainer.model.forward = forward_outside_the_check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.optimise(rollout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
