"""Every module that offers an OSPO option reads its default (and its accepted names) from ospo_fast.defaults."""

import argparse
import inspect
from dataclasses import fields

import pytest

from ospo_fast import defaults
from ospo_fast.advantages import DEFAULT_MAX_SHARE, REDISTRIBUTION_MODES, SCALES, group_advantages, redistribute
from ospo_fast.app import defaults as app_defaults
from ospo_fast.app.warm_start import supervised_warm_start
from ospo_fast.attribution import OwenAttributor
from ospo_fast.loss import LOSS_TYPES
from ospo_fast.segment import Segmenter, SpacySegmenter
from ospo_fast.trainer import OSPOConfig


def _defaults(func) -> dict:
    return {name: p.default for name, p in inspect.signature(func).parameters.items()}


def test_advantages_read_the_defaults():
    assert REDISTRIBUTION_MODES is defaults.REDISTRIBUTION_MODES
    assert SCALES is defaults.ADVANTAGE_SCALES
    assert DEFAULT_MAX_SHARE == defaults.MAX_SHARE
    got = _defaults(redistribute)
    assert (got["mode"], got["alpha"], got["floor"], got["max_share"]) == (
        defaults.REDISTRIBUTION, defaults.ALPHA, defaults.FLOOR, defaults.MAX_SHARE)
    got = _defaults(group_advantages)
    assert (got["scale"], got["eps"]) == (defaults.ADVANTAGE_SCALE, defaults.GROUP_EPS)


def test_attributor_and_segmenters_read_the_defaults():
    got = _defaults(OwenAttributor)
    assert (got["method"], got["budget"], got["seed"]) == (defaults.ATTRIBUTION_METHOD, defaults.BUDGET, defaults.SEED)
    assert _defaults(Segmenter)["max_players"] == defaults.SEGMENTER_MAX_PLAYERS
    assert _defaults(SpacySegmenter)["max_players"] == defaults.SEGMENTER_MAX_PLAYERS


def test_ospo_config_reads_the_defaults():
    config = {f.name: f.default for f in fields(OSPOConfig)}
    expected = dict(
        output_dir=defaults.OUTPUT_DIR, mode=defaults.TRAINING_MODE, redistribution=defaults.REDISTRIBUTION,
        alpha=defaults.ALPHA, floor=defaults.FLOOR, max_share=defaults.MAX_SHARE,
        advantage_scale=defaults.ADVANTAGE_SCALE, group_size=defaults.GROUP_SIZE,
        prompts_per_step=defaults.PROMPTS_PER_STEP, max_steps=defaults.MAX_STEPS,
        learning_rate=defaults.LEARNING_RATE, max_new_tokens=defaults.MAX_NEW_TOKENS,
        temperature=defaults.TEMPERATURE, loss_type=defaults.LOSS_TYPE, beta=defaults.BETA,
        attribution_method=defaults.ATTRIBUTION_METHOD, attribution_budget=defaults.BUDGET,
        max_players=defaults.SEGMENTER_MAX_PLAYERS, seed=defaults.SEED, save_steps=defaults.SAVE_STEPS,
    )
    assert {name: config[name] for name in expected} == expected
    got = _defaults(supervised_warm_start)
    assert (got["steps"], got["learning_rate"]) == (app_defaults.WARM_START_STEPS, app_defaults.WARM_START_LR)


@pytest.mark.parametrize("field, names", [("mode", defaults.TRAINING_MODES),
                                          ("redistribution", defaults.REDISTRIBUTION_MODES),
                                          ("advantage_scale", defaults.ADVANTAGE_SCALES),
                                          ("attribution_method", defaults.ATTRIBUTION_METHODS)])
def test_ospo_config_accepts_exactly_the_named_choices(field, names):
    for name in names:
        OSPOConfig(**{field: name})
    with pytest.raises(ValueError, match=field):
        OSPOConfig(**{field: "no-such-choice"})


def test_verl_options_read_the_defaults():
    from ospo_fast.integrations import verl

    assert verl.ESTIMATOR_OPTIONS["mode"] == defaults.REDISTRIBUTION
    assert (verl.ESTIMATOR_OPTIONS["alpha"], verl.ESTIMATOR_OPTIONS["floor"], verl.ESTIMATOR_OPTIONS["max_share"]) == (
        defaults.ALPHA, defaults.FLOOR, defaults.MAX_SHARE)
    assert verl.ATTRIBUTION_OPTIONS == dict(method=defaults.ATTRIBUTION_METHOD, budget=defaults.BUDGET,
                                            seed=defaults.SEED, max_players=defaults.SEGMENTER_MAX_PLAYERS)
    for func in (verl.grpo_sequence_advantages, verl.ospo_advantages, verl.compute_ospo_advantage):
        assert _defaults(func)["epsilon"] == defaults.VERL_GRPO_EPS
    got = _defaults(verl.ospo_advantages)
    assert (got["mode"], got["alpha"], got["floor"], got["max_share"]) == (
        defaults.REDISTRIBUTION, defaults.ALPHA, defaults.FLOOR, defaults.MAX_SHARE)


def test_trl_trainer_reads_the_defaults():
    trl = pytest.importorskip("ospo_fast.integrations.trl", exc_type=ImportError)
    got = _defaults(trl.OSPOGRPOTrainer)
    assert (got["redistribution"], got["alpha"], got["floor"], got["max_share"]) == (
        defaults.REDISTRIBUTION, defaults.ALPHA, defaults.FLOOR, defaults.MAX_SHARE)
    assert (got["attribution_method"], got["attribution_budget"]) == (defaults.ATTRIBUTION_METHOD, defaults.BUDGET)


def test_run_settings_read_the_defaults():
    from ospo_fast.app.experiment import RunSettings
    from ospo_fast.app.tiny import TINY_MODEL

    settings = RunSettings()
    assert (settings.task, settings.eval_every) == (app_defaults.TASK, app_defaults.EVAL_EVERY)
    tiny = RunSettings(model=TINY_MODEL)
    assert tiny.warm_start_steps_or_default() == app_defaults.TINY_WARM_START_STEPS
    assert tiny.warm_start_lr_or_default() == app_defaults.WARM_START_LR
    assert tiny.warm_start_extra_or_default() == app_defaults.TINY_WARM_START_EXTRA
    assert RunSettings(task="credit").warm_start_steps_or_default() == app_defaults.CREDIT_WARM_START_STEPS
    assert settings.warm_start_lr_or_default() == app_defaults.PRETRAINED_WARM_START_LR


@pytest.fixture
def parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """The ``ospo-fast`` subcommands' parsers, built as ``main`` builds them."""
    from ospo_fast.app import cli

    built = {}

    def capture(self, argv=None, namespace=None):
        built["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        cli.main([])
    action = next(a for a in built["parser"]._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def test_cli_choices_come_from_the_named_tuples(parsers):
    for command in ("train", "compare"):
        p = parsers[command]
        assert _action(p, "mode").choices == list(defaults.TRAINING_MODES)
        assert _action(p, "redistribution").choices == list(defaults.REDISTRIBUTION_MODES)
        assert _action(p, "loss_type").choices == list(LOSS_TYPES)
    assert _action(parsers["attribute"], "method").choices == list(defaults.ATTRIBUTION_METHODS)


def test_cli_defaults_come_from_the_constants(parsers):
    from ospo_fast.app import cli
    from ospo_fast.app.comparison import VARIANTS

    d = cli.RUN_DEFAULTS
    assert (d["mode"], d["redistribution"], d["max_share"], d["budget"], d["beta"], d["loss_type"], d["seed"]) == (
        defaults.TRAINING_MODE, defaults.REDISTRIBUTION, defaults.MAX_SHARE, defaults.BUDGET, defaults.BETA,
        defaults.LOSS_TYPE, defaults.SEED)
    assert (d["steps"], d["prompts_per_step"], d["group_size"], d["lr"], d["max_new_tokens"], d["temperature"],
            d["eval_every"], d["save_steps"], d["bf16"], d["task"]) == (
        app_defaults.MAIN_JOB_STEPS, defaults.PROMPTS_PER_STEP, app_defaults.MAIN_JOB_GROUP_SIZE,
        app_defaults.MAIN_JOB_LEARNING_RATE, app_defaults.MAIN_JOB_MAX_NEW_TOKENS, app_defaults.MAIN_JOB_TEMPERATURE,
        app_defaults.MAIN_JOB_EVAL_EVERY, app_defaults.MAIN_JOB_SAVE_STEPS, app_defaults.MAIN_JOB_BF16,
        app_defaults.TASK)
    assert _action(parsers["train"], "output").default == defaults.OUTPUT_DIR
    assert _action(parsers["compare"], "output").default == app_defaults.COMPARE_OUTPUT_DIR
    assert _action(parsers["compare"], "seeds").default == list(app_defaults.COMPARE_SEEDS)
    assert _action(parsers["compare"], "variants").default == list(VARIANTS)
    assert _action(parsers["eval"], "max_new_tokens").default == app_defaults.MAIN_JOB_MAX_NEW_TOKENS
    attribute = parsers["attribute"]
    assert (_action(attribute, "method").default, _action(attribute, "budget").default) == (
        defaults.ATTRIBUTION_METHOD, defaults.PLAN_BUDGET)
    assert _action(parsers["demo"], "permutations").default == defaults.NUM_PERMUTATIONS
    assert f"about {app_defaults.TINY_LEARNING_RATE}" in _action(parsers["train"], "lr").help


def test_defaults_import_nothing_of_the_package():
    source = inspect.getsource(defaults)
    assert "\nfrom ." not in source and "\nimport ospo_fast" not in source
