"""Hostile and demanding use of the trainer and the run folder: bad settings, NaN rewards, torn files,
conflicting resumes and untrusted checkpoints fail clearly, and nothing on disk is silently wrong."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from ospo_fast.advantages import group_advantages
from ospo_fast.app import cli, experiment
from ospo_fast.app.experiment import RunSettings
from ospo_fast.app.tiny import build_tokenizer, tiny_causal_lm
from ospo_fast.trainer import CHECKPOINT, METRICS, OSPOConfig, OSPOTrainer


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
    monkeypatch.setattr(experiment, "make_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="train: attribution_budget: expected an int >= 2"):
        cli.main(["train", "--model", "tiny", "--output", str(tmp_path / "run"), "--budget", "1"])
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# Non-finite rewards, losses and gradients


KEYWORDS = [["red", "running", "shoes"], ["usb", "charger", "cable"]]
PROMPTS = [[{"role": "user", "content": "shoes for a run"}], [{"role": "user", "content": "charge my phone"}]]


def keyword_reward(texts, owners):
    return torch.tensor([sum(w in t for w in KEYWORDS[o]) / 3 for t, o in zip(texts, owners)], dtype=torch.float64)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["<think>run</think><answer>red running shoes</answer>", "usb c charger cable for iphone"] * 20
    return build_tokenizer(corpus, vocab_size=300)


def make_trainer(tokenizer, tmp_path, reward=keyword_reward, seed=0, **overrides):
    options = dict(output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6,
                   learning_rate=1e-3, save_steps=1, progress=False, seed=seed)
    options.update(overrides)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, seed=0)
    return OSPOTrainer(model, tokenizer, reward, PROMPTS, [0, 1], OSPOConfig(**options))


def nan_once(at_call: int):
    """A reward that returns NaN for its second response on call ``at_call`` (0-based)."""
    calls = []

    def reward(texts, owners):
        out = keyword_reward(texts, owners)
        if len(calls) == at_call:
            out[1] = float("nan")
        calls.append(1)
        return out

    return reward


def test_group_advantages_refuses_nan_rewards():
    with pytest.raises(ValueError, match=r"rewards: NaN or infinite values at responses \[1, 2\]"):
        group_advantages(torch.tensor([0.0, float("nan"), float("inf"), 1.0]), 2)


@pytest.mark.parametrize("mode", ["grpo", "ospo"])
def test_a_nan_reward_stops_the_run_before_any_update_and_keeps_the_checkpoint(tokenizer, tmp_path, mode):
    # The reward is called once a step: the NaN comes at step 2, after step 1's checkpoint.
    trainer = make_trainer(tokenizer, tmp_path, reward=nan_once(1), mode=mode, attribution_method="exact")
    message = (r"reward: returned NaN or infinite values \[nan\] for responses 1 \(prompt \d, completion 1\)"
               if mode == "grpo" else "NaN or infinite")
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.step == 1
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["step"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), saved["model"][name])  # no update after the checkpoint


def test_a_nan_loss_skips_the_update_with_a_warning_and_a_metric(tokenizer, tmp_path, monkeypatch):
    import ospo_fast.trainer.loop as trainer_module

    trainer = make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    real_loss = trainer_module.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(trainer_module, "grpo_loss", nan_loss)
    with pytest.warns(RuntimeWarning, match="NaN or infinite; 1 update"):
        history = trainer.train()
    assert history[0]["skipped_updates"] == 1.0
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    # The optimizer's moments are untouched too, so the next good step is an ordinary first step.
    assert all(not torch.isnan(t).any() for s in trainer.optimizer.state.values() for t in s.values())


def test_a_finite_step_reports_no_skipped_update(tokenizer, tmp_path):
    history = make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=1).train()
    assert history[0]["skipped_updates"] == 0.0


# ----------------------------------------------------------------------------------------------------
# Checkpoints: plain data only, clear errors, the saved config wins


def test_checkpoint_loads_with_weights_only_and_restores_numpy_and_python_generators(tokenizer, tmp_path):
    import random

    import numpy as np

    trainer = make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=1)
    trainer.train()
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)  # raises on any pickled object
    np_draw, py_draw = np.random.rand(), random.random()
    np.random.seed(123), random.seed(123)
    from ospo_fast.trainer.checkpoint import set_rng_states

    set_rng_states(saved["rng"])
    # The generators were saved after step 1; the draws right after saving match those after restoring.
    assert (np.random.rand(), random.random()) == (np_draw, py_draw)


def test_a_checkpoint_with_pickled_code_is_refused(tokenizer, tmp_path):
    import os

    class Exploit:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    trainer = make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=1)
    trainer.train()
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    state["order"] = Exploit()
    torch.save(state, tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match=r"checkpoint.pt: holds something other than tensors and plain data"):
        make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=2).train(resume=True)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a dict", "missing keys"])
def test_a_damaged_checkpoint_names_the_file_and_what_was_expected(tokenizer, tmp_path, damage):
    trainer = make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=1)
    trainer.train()
    path = tmp_path / CHECKPOINT
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not a dict":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"step": 1, "model": {}}, path)
    message = {"empty": "cannot be read", "truncated": "cannot be read", "not a dict": "incomplete checkpoint",
               "missing keys": r"incomplete checkpoint \(missing \['attributor', 'config'"}[damage]
    with pytest.raises(ValueError, match=rf"{CHECKPOINT}: {message}.*expected a checkpoint written by"):
        make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=2).train(resume=True)


@pytest.mark.parametrize("field,value", [("mode", "ospo"), ("group_size", 4), ("seed", 7), ("loss_type", "dapo"),
                                         ("redistribution", "rank"), ("prompts_per_step", 1)])
def test_resume_refuses_a_config_that_changes_the_run(tokenizer, tmp_path, field, value):
    make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=1).train()
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    other = make_trainer(tokenizer, tmp_path, **{"mode": "grpo", "max_steps": 2, field: value})
    with pytest.raises(ValueError, match=rf"config.{field}: the run at .* was saved with "
                                         rf"{field}={saved['config'][field]!r}, this trainer has {value!r}"):
        other.train(resume=True)
    assert other.step == 0


def test_resume_may_extend_the_run_and_change_how_it_saves_and_shows_progress(tokenizer, tmp_path):
    make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=1).train()
    trainer = make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=2, save_steps=2, micro_batch_size=1)
    trainer.train(resume=True)
    assert trainer.step == 2


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl: whole lines, and a torn last line tolerated everywhere


def test_resume_drops_a_torn_last_metrics_line(tokenizer, tmp_path):
    make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=1).train()
    with open(tmp_path / METRICS, "a") as f:  # a crash in the middle of appending step 2's line
        f.write('{"step": 2, "reward": 0.5, "lo')
    trainer = make_trainer(tokenizer, tmp_path, mode="grpo", max_steps=2)
    trainer.train(resume=True)
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_a_damaged_metrics_line_before_the_last_names_the_file_and_line(tmp_path):
    from ospo_fast.trainer import read_metrics

    path = tmp_path / METRICS
    path.write_text('{"step": 1}\n{"step": 2, "rew\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON object"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"step": 2, "rew')
    assert read_metrics(path) == [{"step": 1}]


def test_metrics_lines_are_written_in_one_flushed_write(tmp_path, monkeypatch):
    import io

    import ospo_fast.trainer.checkpoint as checkpoint_module

    writes, flushed = [], []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            flushed.append(len(writes))

        def fileno(self):
            return 0

    monkeypatch.setattr(checkpoint_module, "open", lambda *a, **k: Recorder(), raising=False)
    monkeypatch.setattr(checkpoint_module.os, "fsync", lambda fd: None)
    checkpoint_module.append_json_line(tmp_path / METRICS, {"step": 1, "reward": 0.25})
    assert writes == ['{"step": 1, "reward": 0.25}\n'] and flushed == [1]


def test_report_readers_tolerate_a_torn_last_metrics_line(tmp_path):
    from ospo_fast.app.experiment import _step_seconds
    from ospo_fast.app.report import format_lines, plot_curves

    steps = [dict(step=s, reward=0.1 * s, format_rate=1.0, completion_length=5.0, step_seconds=2.0,
                  generation_seconds=1.0, attribution_seconds=0.5, optimise_seconds=0.5) for s in (1, 2)]
    text = "".join(json.dumps(s) + "\n" for s in steps) + json.dumps({"step": 2, "eval_ndcg@10": 0.3}) + "\n"
    (tmp_path / METRICS).write_text(text + '{"step": 3, "reward": 0.')
    assert _step_seconds(tmp_path)["step"] == 2.0
    assert any("reward 0.150 → 0.150" in line for line in format_lines(tmp_path, {}))
    plot_curves(tmp_path)
    assert (tmp_path / "reward.png").is_file() and (tmp_path / "ndcg.png").is_file()


# ----------------------------------------------------------------------------------------------------
# The command line: run folders, resume with the saved config, eval of damaged runs



def fake_run_folder(path, settings=None, **config):
    """A run folder with a complete (weightless) checkpoint and run.json, as ``ospo-fast train`` leaves it."""
    path.mkdir(parents=True, exist_ok=True)
    saved = asdict(OSPOConfig(output_dir=str(path), **config))
    state = dict(step=1, config=saved, model={}, optimizer={}, scheduler={}, data_rng={}, order=[], rng={},
                 attributor=None)
    torch.save(state, path / CHECKPOINT)
    settings = asdict(settings or RunSettings(model="tiny"))
    (path / "run.json").write_text(json.dumps(dict(settings=settings, config=saved)))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model would be built or loaded."""
    monkeypatch.setattr(experiment, "make_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(experiment, "load_task", lambda *a, **k: pytest.fail("the task was loaded"))


@pytest.fixture
def captured_run(monkeypatch):
    seen = {}

    def fake_run(settings, config, resume=False, overwrite=False):
        seen.update(settings=settings, config=config, resume=resume)
        raise SystemExit("stopped before training")

    monkeypatch.setattr(experiment, "run", fake_run)
    return seen


def test_train_refuses_any_non_empty_folder(tmp_path, no_model):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"already holds a run or other files \(notes.txt\).*--resume.*--overwrite"):
        cli.main(["train", "--model", "tiny", "--output", str(out)])
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_the_previous_run_but_not_other_files(tmp_path, monkeypatch):
    out = fake_run_folder(tmp_path / "run", mode="grpo")
    (out / "notes.txt").write_text("mine")
    (out / "policy").mkdir()
    monkeypatch.setattr(experiment, "load_task", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        experiment.run(RunSettings(model="tiny"), OSPOConfig(output_dir=str(out)), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.json"]  # run.json: the new run's


def test_resume_without_a_checkpoint_fails_at_once_and_leaves_no_folder(tmp_path, no_model):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"no checkpoint at .*checkpoint.pt"):
        cli.main(["train", "--model", "tiny", "--output", str(out), "--resume"])
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        experiment.run(RunSettings(model="tiny"), OSPOConfig(output_dir=str(out)), resume=True)
    assert not out.exists()


def test_resume_with_a_truncated_checkpoint_names_the_file(tmp_path, no_model):
    out = fake_run_folder(tmp_path / "run")
    data = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit, match=r"checkpoint.pt: cannot be read .*expected a checkpoint written by"):
        cli.main(["train", "--output", str(out), "--resume"])


def test_cli_resume_uses_the_saved_config_and_settings(tmp_path, captured_run):
    out = fake_run_folder(tmp_path / "run", mode="ospo", group_size=4, seed=0, max_steps=5, learning_rate=3e-5)
    with pytest.raises(SystemExit, match="stopped before training"):
        cli.main(["train", "--output", str(out), "--resume", "--steps", "9", "--eval-every", "3"])
    config, settings = captured_run["config"], captured_run["settings"]
    assert (config.mode, config.group_size, config.seed, config.learning_rate) == ("ospo", 4, 0, 3e-5)
    assert config.max_steps == 9 and settings.eval_every == 3 and settings.model == "tiny"


@pytest.mark.parametrize("flags,message", [
    (["--mode", "grpo"], r"--mode 'grpo' conflicts with the saved run's mode='ospo'"),
    (["--group-size", "2"], r"--group-size 2 conflicts with the saved run's group_size=4"),
    (["--seed", "7"], r"--seed 7 conflicts with the saved run's seed=0"),
    (["--model", "other"], r"--model 'other' conflicts with the saved run's model='tiny'"),
])
def test_cli_resume_refuses_a_flag_that_conflicts_with_the_saved_run(tmp_path, captured_run, flags, message):
    out = fake_run_folder(tmp_path / "run", mode="ospo", group_size=4, seed=0)
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", "--output", str(out), "--resume", *flags])
    assert not captured_run


def test_cli_resume_accepts_a_flag_equal_to_the_saved_value(tmp_path, captured_run):
    out = fake_run_folder(tmp_path / "run", mode="ospo", group_size=4, seed=0)
    with pytest.raises(SystemExit, match="stopped before training"):
        cli.main(["train", "--output", str(out), "--resume", "--mode", "ospo", "--group-size", "4"])
    assert captured_run["config"].group_size == 4


def test_api_resume_with_a_conflicting_config_fails_before_loading_a_model(tmp_path, no_model):
    out = fake_run_folder(tmp_path / "run", mode="ospo", group_size=4)
    with pytest.raises(ValueError, match=r"config.group_size: the run at .* was saved with group_size=4, this "
                                         r"trainer has 2"):
        experiment.run(RunSettings(model="tiny"), OSPOConfig(output_dir=str(out), group_size=2), resume=True)


def finished_run_folder(path, eval_json='{"settings": {"model": "tiny"}, "config": {"seed": 0}}', policy=True):
    path.mkdir(parents=True)
    if eval_json is not None:
        (path / "eval.json").write_text(eval_json)
    if policy:
        (path / "policy").mkdir()
        (path / "policy" / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("case,message", [
    ("missing folder", r"eval: --run .*nothing-here: no such folder; expected a run folder"),
    ("half-written", r"eval.json: missing, so the run has not finished; finish it with `ospo-fast train --output"),
    ("no policy", r"policy: no saved model \(config.json\); expected the trained policy"),
    ("malformed json", r"eval.json: not valid JSON .*expected the file written by `ospo-fast train`"),
    ("no settings", r"eval.json: no 'settings'; expected the file written by `ospo-fast train`"),
    ("no seed", r"eval.json: no 'config.seed'"),
    ("unknown settings", r"eval.json: unknown settings \['colour'\]"),
])
def test_eval_of_a_damaged_run_names_the_file_and_what_was_expected(tmp_path, monkeypatch, case, message):
    import ospo_fast.policy as policy_module

    monkeypatch.setattr(policy_module, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    run = {
        "missing folder": lambda: tmp_path / "nothing-here",
        "half-written": lambda: finished_run_folder(tmp_path / "r", eval_json=None, policy=False),
        "no policy": lambda: finished_run_folder(tmp_path / "r", policy=False),
        "malformed json": lambda: finished_run_folder(tmp_path / "r", eval_json='{"settings": {'),
        "no settings": lambda: finished_run_folder(tmp_path / "r", eval_json='{"config": {"seed": 0}}'),
        "no seed": lambda: finished_run_folder(tmp_path / "r", eval_json='{"settings": {}, "config": {}}'),
        "unknown settings": lambda: finished_run_folder(
            tmp_path / "r", eval_json='{"settings": {"colour": 1}, "config": {"seed": 0}}'),
    }[case]()
    with pytest.raises(SystemExit, match=message):
        cli.main(["eval", "--run", str(run)])
