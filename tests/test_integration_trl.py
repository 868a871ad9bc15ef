"""OSPOGRPOTrainer: TRL's GRPOTrainer with OSPO's per-token advantages, on CPU with a tiny local causal LM."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig  # noqa: E402

from ospo_fast.app.tiny import build_tokenizer, tiny_causal_lm  # noqa: E402
from ospo_fast.attribution import OwenAttributor  # noqa: E402
from ospo_fast.integrations.trl import OSPOGRPOTrainer  # noqa: E402

WORDS = (
    "soft cotton tee for summer navy blue slim fit wireless charger for iphone fast charging cable usb "
    "red running shoes for women size with arch support and white"
).split()
PROMPTS = ["find an iphone charger", "a cotton tee for summer", "running shoes for women", "navy blue slim fit"]
TARGETS = ["iphone charger cable", "cotton tee summer", "running shoes women", "navy blue slim"]


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(300)]
    return build_tokenizer(texts, vocab_size=400)


class RecordingTrainer(OSPOGRPOTrainer):
    """Keeps the inputs that reach TRL's loss."""

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return super()._compute_loss(model, inputs)


def train_one_step(tokenizer, tmp_path, reward_funcs, dataset=None, **kwargs) -> RecordingTrainer:
    dataset = dataset if dataset is not None else datasets.Dataset.from_dict({"prompt": PROMPTS, "target": TARGETS})
    config_kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
        max_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, seed=0,
        disable_tqdm=True,
    )
    config_kwargs.update(kwargs.pop("config", {}))
    trainer = RecordingTrainer(
        tiny_causal_lm(tokenizer, hidden_size=64, num_layers=1, num_heads=2), reward_funcs=reward_funcs,
        args=GRPOConfig(**config_kwargs), train_dataset=dataset, processing_class=tokenizer, **kwargs,
    )
    trainer.loss_inputs = []
    trainer.train()
    return trainer


def word_overlap(prompts, completions, target, **kwargs):
    """A TRL reward function that needs a dataset column: the share of the target's words in the completion."""
    out = []
    for completion, words in zip(completions, target):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        found = set(text.lower().split())
        out.append(len(found & set(words.split())) / len(words.split()) + 0.01 * len(text.split()))
    return out


def token_means(inputs) -> torch.Tensor:
    mask = inputs["completion_mask"].bool()
    return (inputs["advantages"] * mask).sum(1) / mask.sum(1).clamp(min=1)


def test_advantages_reaching_the_loss_are_per_token(tokenizer, tmp_path):
    trainer = train_one_step(tokenizer, tmp_path, word_overlap)
    assert trainer.loss_inputs
    for inputs in trainer.loss_inputs:
        assert inputs["advantages"].shape == inputs["completion_ids"].shape


def test_token_mean_of_advantages_equals_trl_sequence_advantage(tokenizer, tmp_path):
    trainer = train_one_step(tokenizer, tmp_path, word_overlap)
    for inputs in trainer.loss_inputs:
        mask = inputs["completion_mask"].bool()
        has_tokens = mask.any(1)
        torch.testing.assert_close(
            token_means(inputs)[has_tokens], inputs["sequence_advantages"][has_tokens], rtol=1e-5, atol=1e-6
        )
        assert (inputs["advantages"][~mask] == 0).all()


def test_redistribution_moves_advantage_between_tokens(tokenizer, tmp_path):
    trainer = train_one_step(tokenizer, tmp_path, word_overlap)
    inputs = trainer.loss_inputs[0]
    mask = inputs["completion_mask"].bool()
    spread = [inputs["advantages"][j][mask[j]].unique().numel() for j in range(mask.shape[0])]
    assert max(spread) > 1  # GRPO would give every token of a completion the same advantage


@pytest.mark.parametrize("redistribution", ["proportional", "rank", "hybrid", "signed"])
def test_tokens_outside_the_segments_get_trls_advantage(tokenizer, tmp_path, redistribution):
    trainer = train_one_step(tokenizer, tmp_path, word_overlap, redistribution=redistribution)
    for inputs in trainer.loss_inputs:
        mask = inputs["completion_mask"].bool()
        outside = mask & ~inputs["segment_mask"]
        assert outside.any()  # the end-of-sequence token and the final "." at least
        expected = inputs["sequence_advantages"][:, None].expand_as(mask)
        assert torch.equal(inputs["advantages"][outside], expected[outside])


def test_signed_mode_gives_segment_tokens_their_groups_segment_advantage(tokenizer, tmp_path):
    from ospo_fast.advantages import group_segment_advantages

    trainer = train_one_step(tokenizer, tmp_path, word_overlap, redistribution="signed")
    credit = trainer.ospo_last_credit
    # beta = 1: a segment token's advantage is its segment's advantage against its group's segments. TRL shuffles
    # the batch before the loss sees it: compare the values of all segment tokens as sorted lists.
    got = torch.cat([x["advantages"][x["segment_mask"] & x["completion_mask"].bool()] for x in trainer.loss_inputs])
    expected = group_segment_advantages(credit.worth, credit.token_player, 4)
    mask = torch.cat([x["completion_mask"] for x in trainer.loss_inputs]).bool()
    expected = expected[credit.segment_mask.to(expected.device)]
    assert mask.any() and got.numel() == expected.numel()
    torch.testing.assert_close(got.sort().values, expected.to(got).sort().values, rtol=1e-5, atol=1e-6)


def test_resume_restores_the_attributors_generator(tokenizer, tmp_path):
    # Sampled plans draw fresh orders at every step; a resumed run continues the uninterrupted run's draws.
    options = dict(attribution_method="sampled", config=dict(max_steps=2, save_strategy="steps", save_steps=1))
    straight = train_one_step(tokenizer, tmp_path / "straight", word_overlap, **options)
    resumed = train_one_step(tokenizer, tmp_path / "resumed", word_overlap, **options)
    assert resumed.ospo_attributor.state_dict() == straight.ospo_attributor.state_dict()
    resumed.ospo_attributor.load_state_dict(OwenAttributor(word_overlap, seed=7).state_dict())  # elsewhere
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-1"))
    assert resumed.ospo_attributor.state_dict() == straight.ospo_attributor.state_dict()


def construct(tokenizer, tmp_path, **config):
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_generations=2,
                      per_device_train_batch_size=2, **config)
    return OSPOGRPOTrainer(tiny_causal_lm(tokenizer, hidden_size=64, num_layers=1, num_heads=2),
                           reward_funcs=word_overlap, args=args, processing_class=tokenizer,
                           train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS, "target": TARGETS}))


def test_use_liger_kernel_is_refused_where_trl_uses_ligers_grpo_loss(tokenizer, tmp_path, monkeypatch):
    # TRL <= 1.13 computes the loss with Liger's fused GRPO loss (GRPOTrainer.compute_liger_loss).
    from trl import GRPOTrainer

    monkeypatch.setattr(GRPOTrainer, "compute_liger_loss", lambda self, *a: None, raising=False)
    with pytest.raises(ValueError, match="use_liger_kernel.*one advantage per sequence"):
        construct(tokenizer, tmp_path, use_liger_kernel=True)


def test_use_liger_kernel_is_accepted_where_trl_uses_its_own_loss(tokenizer, tmp_path, monkeypatch):
    # TRL >= 1.14: Liger only patches the layers; TRL's own loss takes the [B, T] advantages.
    from trl import GRPOTrainer

    monkeypatch.delattr(GRPOTrainer, "compute_liger_loss", raising=False)
    trainer = construct(tokenizer, tmp_path, use_liger_kernel=True)
    assert trainer.args.use_liger_kernel


def test_trl_older_than_the_minimum_is_refused_at_construction(tokenizer, tmp_path, monkeypatch):
    import trl

    from ospo_fast.integrations.trl import MIN_TRL_VERSION

    monkeypatch.setattr(trl, "__version__", "1.0.0")
    with pytest.raises(ImportError, match=rf"trl>={MIN_TRL_VERSION}.*trl 1\.0\.0 is installed"):
        construct(tokenizer, tmp_path)
    monkeypatch.setattr(trl, "__version__", MIN_TRL_VERSION)
    construct(tokenizer, tmp_path)


def test_ospo_statistics_appear_in_the_logged_metrics(tokenizer, tmp_path):
    trainer = train_one_step(tokenizer, tmp_path, word_overlap)
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items() if k.startswith("ospo/")}
    advantages = torch.cat([x["advantages"] for x in trainer.loss_inputs])
    mask = torch.cat([x["completion_mask"] for x in trainer.loss_inputs]).bool()
    rows = [advantages[j][mask[j]] for j in range(len(mask)) if mask[j].any()]
    expected_std = sum(r.std(unbiased=False).item() for r in rows) / len(rows)
    expected_nonuniform = sum(r.unique().numel() > 1 for r in rows) / len(rows)
    assert logged["ospo/token_advantage_std"] == pytest.approx(expected_std, rel=1e-4)
    assert logged["ospo/token_advantage_std"] > 0  # GRPO's would be 0
    assert logged["ospo/nonuniform_fraction"] == pytest.approx(expected_nonuniform)
    assert logged["ospo/reward_calls_per_completion"] == pytest.approx(logged["ospo/reward_evaluations"] / len(mask))
    assert logged["ospo/reward_calls_per_completion"] >= 1
    assert logged["ospo/segments_per_completion"] > 0
    assert logged["ospo/attribution_seconds"] > 0


def test_coalitions_are_scored_with_their_own_rows_columns(tokenizer, tmp_path):
    target_of = dict(zip(PROMPTS, TARGETS))
    calls = []

    def checked_overlap(prompts, completions, target, trainer_state, **kwargs):
        assert len(prompts) == len(completions) == len(target)
        assert all(target_of[p] == t for p, t in zip(prompts, target))
        calls.append(len(completions))
        return word_overlap(prompts, completions, target)

    train_one_step(tokenizer, tmp_path, checked_overlap)
    assert len(calls) == 2  # TRL's own call, then one call for every coalition of the batch
    assert calls[1] > calls[0]


def test_conversational_prompts_get_assistant_message_coalitions(tokenizer, tmp_path):
    seen = []

    def conversational_overlap(prompts, completions, target, **kwargs):
        seen.extend(completions)
        return word_overlap(prompts, completions, target)

    dataset = datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": p}] for p in PROMPTS], "target": TARGETS}
    )
    trainer = train_one_step(tokenizer, tmp_path, conversational_overlap, dataset=dataset)
    assert all(isinstance(c, list) and c[-1]["role"] == "assistant" for c in seen)
    for inputs in trainer.loss_inputs:
        mask = inputs["completion_mask"].bool().any(1)
        torch.testing.assert_close(token_means(inputs)[mask], inputs["sequence_advantages"][mask])


def test_ospo_reward_reads_owners_from_the_owner_column(tokenizer, tmp_path):
    owners_seen = set()

    def pool_reward(texts, owners):
        owners_seen.update(int(o) for o in owners)
        return [float(len(t.split()) % 3) for t in texts]

    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS, "owner": [7, 8, 9, 10]})
    train_one_step(tokenizer, tmp_path, lambda completions, **kw: [0.0] * len(completions), dataset=dataset,
                   ospo_reward=pool_reward, owner_column="owner")
    assert owners_seen and owners_seen <= {7, 8, 9, 10}


def test_reward_model_without_ospo_reward_is_refused(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    policy = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=1, num_heads=2)
    config = LlamaConfig(**{**policy.config.to_dict(), "num_labels": 1})
    reward_model = LlamaForSequenceClassification(config)
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_generations=2,
                      per_device_train_batch_size=2)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    with pytest.raises(ValueError, match="reward model.*ospo_reward"):
        OSPOGRPOTrainer(policy, reward_funcs=reward_model, args=args, train_dataset=dataset,
                        processing_class=tokenizer, reward_processing_classes=tokenizer)


class RewardRecordingTrainer(RecordingTrainer):
    """Also keeps the completions TRL scored and the rewards its reward functions gave them."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.trl_scored.append((list(completions), rewards_per_func.detach().cpu()))
        return rewards_per_func


def test_game_value_of_each_whole_completion_is_the_reward_trl_computed(tmp_path, monkeypatch):
    """v(N) of each completion's game (all its segments, with the punctuation between them, in the frame of
    the text around them) is the reward TRL's reward function gave the completion; the reward counts the
    punctuation, so segments joined by spaces would score differently."""
    import ospo_fast.integrations.trl as ospo_trl
    from ospo_fast.segment import Segmenter

    rng = random.Random(1)
    separators = [", ", ". ", "; ", " & ", " (", ") ", ": ", " - ", "! "]
    texts = ["".join(rng.choice(WORDS) + rng.choice(separators + [" "] * 4) for _ in range(12)) for _ in range(300)]
    tokenizer = build_tokenizer(texts, vocab_size=400)

    def punctuation_reward(prompts, completions, **kwargs):
        return [c.count(",") + 2 * c.count(". ") + 0.5 * c.count("&") + 0.01 * len(c) for c in completions]

    credits, attribute_completions = [], ospo_trl.attribute_completions

    def recording_attribute_completions(*args, **kwargs):  # the games of each batch, v(N) among their values
        credits.append(attribute_completions(*args, **kwargs))
        return credits[-1]

    monkeypatch.setattr(ospo_trl, "attribute_completions", recording_attribute_completions)
    config = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=24,
        max_steps=2, report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, seed=0,
        disable_tqdm=True,
    )
    trainer = RewardRecordingTrainer(
        tiny_causal_lm(tokenizer, hidden_size=64, num_layers=1, num_heads=2), reward_funcs=punctuation_reward,
        args=config, train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS, "target": TARGETS}),
        processing_class=tokenizer, segmenter=Segmenter(max_players=6),
    )
    trainer.loss_inputs, trainer.trl_scored = [], []
    trainer.train()

    assert len(credits) == len(trainer.trl_scored) >= 2
    joined_differently = 0
    for credit, (completions, rewards) in zip(credits, trainer.trl_scored):
        assert credit.texts == completions  # what the game segments is what TRL scored
        # TRL keeps its rewards in float32, the game in float64: equal once rounded the same way.
        assert torch.equal(credit.full_values.float(), rewards[:, 0]), (credit.full_values, rewards[:, 0])
        for a, text in zip(credit.attributions, completions):
            sg = a.segmentation
            if sg.num_players:
                spaced = text[: sg.spans[0][0]] + " ".join(sg.segments) + text[sg.spans[-1][1] :]
                joined_differently += punctuation_reward(None, [spaced]) != punctuation_reward(None, [text])
    assert joined_differently > 0  # the old single-space join would have missed TRL's reward here


def test_reward_model_recipe_in_the_docs_runs(tmp_path, monkeypatch):
    """docs/integrations.md's reward-model recipe runs as written, and its game sees each row's prompt."""
    import pathlib
    import re

    docs = (pathlib.Path(__file__).parents[1] / "docs" / "integrations.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", docs, re.S) if "rm_ospo_reward" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "integrations.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert logged["ospo/reward_evaluations"] > 0
    scores = namespace["rm_ospo_reward"](["soft cable", "soft cable"], [0, 1])  # the prompt changes the score
    assert scores.shape == (2,) and scores[0] != scores[1]
