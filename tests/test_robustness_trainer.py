"""Hostile and demanding use of the trainer and the run folder: bad settings, NaN rewards, torn files,
conflicting resumes and untrusted checkpoints fail clearly, and nothing on disk is silently wrong."""

from __future__ import annotations

import math

import pytest

from ospo_fast.trainer import OSPOConfig


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(max_grad_norm=-1.0), r"max_grad_norm: expected a finite number in \(0, inf\), got -1"),
        (dict(max_grad_norm=0), r"max_grad_norm: expected a finite number in \(0, inf\), got 0"),
        (dict(max_grad_norm=math.nan), r"max_grad_norm: expected a finite number in \(0, inf\), got nan"),
        (dict(learning_rate=math.inf), r"learning_rate: expected a finite number in \(0, inf\), got inf"),
        (dict(top_p=0.0), r"top_p: expected a finite number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p: expected a finite number in \(0, 1\]"),
        (dict(warmup_steps=-1), "warmup_steps: expected a non-negative int, got -1"),
        (dict(warmup_steps=2.5), "warmup_steps: expected a non-negative int"),
        (dict(attribution_budget=1), "attribution_budget: expected an int >= 2"),
        (dict(attribution_dtype="foo"), "attribution_dtype: expected None or a floating torch dtype name"),
        (dict(attribution_dtype="int64"), "attribution_dtype: expected None or a floating torch dtype name"),
        (dict(seed=-1), "seed: expected a non-negative int, got -1"),
        (dict(seed=1.0), "seed: expected a non-negative int"),
        (dict(temperature=0.0), r"temperature: expected a finite number in \(0, inf\)"),
        (dict(temperature=math.nan), r"temperature: expected a finite number in \(0, inf\)"),
        (dict(weight_decay=-0.1), r"weight_decay: expected a finite number in \[0, inf\)"),
        (dict(beta=math.inf), r"beta: expected a finite number in \[0, inf\)"),
        (dict(eps_low=1.0), r"eps_low: expected a finite number in \[0, 1\)"),
        (dict(eps_high=-0.2), r"eps_high: expected a finite number in \[0, inf\)"),
        (dict(alpha=1.5), r"alpha: expected a finite number in \[0, 1\]"),
        (dict(floor=-0.1), r"floor: expected a finite number in \[0, 1\]"),
        (dict(max_share=0.5), r"max_share: expected a finite number in \[1, inf\)"),
        (dict(clip=-1.0), "clip: expected a positive bound"),
        (dict(advantage_scale="std"), "advantage_scale: expected one of"),
        (dict(loss_type="ppo"), "loss_type: expected one of"),
        (dict(loss_backend="cuda"), "loss_backend: expected one of"),
        (dict(attribution_method="kernelshap"), "attribution_method: expected one of"),
        (dict(max_players=10_000), "max_players: expected an int in"),
        (dict(micro_batch_size=0), "micro_batch_size: expected a positive int"),
        (dict(bf16="yes"), "bf16: expected None, True or False"),
        (dict(lora=["q_proj"]), "lora: expected None or a dict"),
        (dict(output_dir=""), "output_dir: expected a non-empty path"),
    ],
)
def test_every_config_value_is_checked_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        OSPOConfig(**overrides)


def test_config_changed_after_construction_is_checked_again():
    config = OSPOConfig()
    config.max_grad_norm = -1.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        config.check()


def test_cli_budget_of_one_fails_before_any_model_is_loaded(monkeypatch, tmp_path):
    from ospo_fast import cli, experiment

    monkeypatch.setattr(experiment, "make_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="attribution_budget: expected an int >= 2"):
        cli.main(["train", "--model", "tiny", "--output", str(tmp_path / "run"), "--budget", "1"])
    assert not (tmp_path / "run").exists()
