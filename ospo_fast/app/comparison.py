"""``ospo-fast compare``: training variants compared seed by seed, with paired intervals and a power estimate.

Within a seed every variant starts from the same policy (after the same warm start, for the tiny model),
the same split, the same pools and the same sampling seed stream; only the advantages differ:

- ``grpo``: every token of a response gets its advantage;
- ``ospo``: Owen-value credit, redistributed in the configured mode;
- ``shuffled``: the same credit values permuted among each response's segments (the control that separates
  "the right tokens get the credit" from "advantages are reweighted at all");
- ``proportional``, ``rank``, ``hybrid``: OSPO in that redistribution mode.

Each (seed, variant) result is written to ``compare.json`` as soon as it exists, so an interrupted
comparison continues where it stopped when run again with the same settings. Paired differences
(``ospo - grpo``, ``ospo - shuffled``) get a Student-t interval over seeds; the power line says how many
seeds a +0.05 difference of the primary metric would need at the measured spread, and what difference the
seeds used can detect.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..defaults import REDISTRIBUTION_MODES
from ..trainer import CHECKPOINT, OSPOConfig, OSPOTrainer
from . import defaults as app_defaults
from . import experiment
from .evaluation import evaluate_copy_request, evaluate_policy, format_metrics, retrievers, score_answers
from .experiment import RunSettings, training_items, warm_start, write_json
from .stats import detectable_difference, seeds_needed, t_interval

VARIANTS = ("grpo", "ospo", "shuffled")
#: The paired differences reported, when both variants ran.
PAIRS = (("ospo", "grpo"), ("ospo", "shuffled"))
#: Metrics of every variant: the final test NDCG@10 with each retriever, and the area under the training
#: reward curve (its mean over steps). The first is the primary one.
METRICS = ("dense ndcg@10", "reward auc", "bm25 ndcg@10", "lsa ndcg@10")
#: The credit task's reading of the answers (:func:`ospo_fast.app.credit.hint_mix`), where it was recorded.
HINT_METRICS = ("true hints kept", "decoys kept")
#: The difference the power line is sized for.
TARGET_DIFFERENCE = 0.05
#: Steps of the moving average of the training reward that "steps to reach a reward" reads.
REWARD_WINDOW = 5


def variant_config(config: OSPOConfig, variant: str, seed: int, output_dir: Path) -> OSPOConfig:
    """The config of one variant of one seed (everything else equal across variants)."""
    common = dict(seed=seed, output_dir=str(output_dir / f"seed{seed}-{variant}"))
    if variant == "grpo":
        return replace(config, mode="grpo", credit="owen", **common)
    if variant == "ospo":
        return replace(config, mode="ospo", credit="owen", **common)
    if variant == "shuffled":
        return replace(config, mode="ospo", credit="shuffled", **common)
    if variant in REDISTRIBUTION_MODES:
        return replace(config, mode="ospo", credit="owen", redistribution=variant, **common)
    raise ValueError(f"variants: expected names from {VARIANTS + REDISTRIBUTION_MODES}, got {variant!r}")


def _result(evaluation: dict, rewards: list[float] | None = None, seconds: float | None = None,
            validation: list[list[float]] | None = None, hints: dict | None = None) -> dict:
    """One policy's record: test metrics, per-prompt dense NDCG@10, answer statistics and, for a trained
    variant, its reward per step and its validation curve (``[step, dense NDCG@10]`` pairs, step 0 first).
    ``hints``: the credit task's hint mix of the answers, recorded with the metrics."""
    table = evaluation["table"]
    metrics = {f"{r} ndcg@10": table[r]["ndcg@10"] for r in table} | (hints or {})
    if rewards is not None:
        metrics["reward auc"] = statistics.fmean(rewards)
    return dict(metrics=metrics, table=table, ndcg10=evaluation["ndcg10"]["dense"], format=evaluation["format"],
                rewards=rewards, validation=validation, train_seconds=seconds)


def _oracle_answers(task) -> list[str]:
    """The credit task's best answers: the request and its true hints."""
    from .credit import credit_answer

    return [credit_answer(s.query, s.info["true_hints"]) for s in task.samples]


def run_seed(settings: RunSettings, config: OSPOConfig, seed: int, variants: Sequence[str], out: Path,
             done: dict, save) -> dict:
    """The baselines and every variant not yet in ``done`` for one seed; ``save(results)`` after each."""
    results = dict(done)
    torch.manual_seed(seed)
    # Looked up on the module at call time (as the main job does), not bound at import.
    train_task, val_task, test_task = experiment.load_task(settings, seed=seed)
    items = training_items(train_task, val_task, test_task)
    model, tokenizer = experiment.make_policy(settings, train_task, items, seed=seed)
    scorers = retrievers(train_task, fit_items=items)
    if settings.warm_start_steps_or_default() > 0:
        warm_start(model, tokenizer, settings, train_task, seed, config.progress, items, bool(config.bf16))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    evaluate = dict(max_new_tokens=config.max_new_tokens, bf16=bool(config.bf16))

    def validation_ndcg(policy) -> float:  # greedy answers to the validation prompts, training retriever
        result = evaluate_policy(policy, tokenizer, val_task, {"dense": scorers["dense"]}, ks=(10,),
                                 limit=settings.eval_samples, **evaluate)
        return result["table"]["dense"]["ndcg@10"]

    def hints_of(answers: list[str]) -> dict | None:  # the credit task's hint mix
        if not settings.is_credit_task:
            return None
        from .credit import hint_mix

        return hint_mix(test_task.samples, answers)

    start_ndcg = None  # the shared start of every variant's validation curve, computed once
    if "untrained" not in results:
        results["copy request"] = _result(evaluate_copy_request(test_task, scorers))
        if settings.is_credit_task:
            oracle = _oracle_answers(test_task)
            results["request + true hints"] = _result(score_answers(test_task.samples, oracle, oracle, scorers, (10,)),
                                                      hints=hints_of(oracle))
        untrained = evaluate_policy(model, tokenizer, test_task, scorers, ks=(10,), **evaluate)
        results["untrained"] = _result(untrained, hints=hints_of(untrained["answers"]))
        save(results)
    for variant in variants:
        if variant in results:
            continue
        model.load_state_dict(initial)
        if start_ndcg is None:
            start_ndcg = validation_ndcg(model)
        rewards: list[float] = []
        curve = [[0, start_ndcg]]

        def record(trainer, step, metrics, rewards=rewards, curve=curve):
            rewards.append(metrics["reward"])
            if step % settings.eval_every == 0 or step == config.max_steps:
                curve.append([step, validation_ndcg(trainer.model)])

        trainer = OSPOTrainer(model, tokenizer, scorers["dense"], train_task.prompts, train_task.owners,
                              variant_config(config, variant, seed, out), callbacks=[record],
                              answer_metrics=format_metrics)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start  # validation included
        evaluation = evaluate_policy(trainer.model, tokenizer, test_task, scorers, ks=(10,), **evaluate)
        results[variant] = _result(evaluation, rewards, seconds, curve, hints_of(evaluation["answers"]))
        save(results)
        # A comparison resumes per variant, not per step: the variant's checkpoint (the policy and its optimizer
        # state, 1.6 GB for a 135M model) is not needed once its result is saved. Its metrics.jsonl stays.
        (Path(trainer.config.output_dir) / CHECKPOINT).unlink(missing_ok=True)
    return results


def compare(settings: RunSettings, config: OSPOConfig, seeds: Sequence[int], variants: Sequence[str] = VARIANTS,
            output_dir: str = app_defaults.COMPARE_OUTPUT_DIR) -> dict:
    """Runs (or continues) the comparison and writes ``compare.json``, ``compare.md``, ``compare.png`` (paired
    differences) and ``compare_curves.png`` (reward and validation NDCG@10 against steps).
    Returns the contents of ``compare.json`` (see :func:`summarise`)."""
    for variant in variants:
        variant_config(config, variant, 0, Path(output_dir))  # unknown names fail before any work
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.json"
    setup = dict(settings=asdict(settings), config=asdict(config), variants=list(variants))
    per_seed: dict[str, dict] = {}
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in setup} != json.loads(json.dumps(setup)):
            raise ValueError(f"output_dir: {path} holds a comparison with other settings; choose another --output")
        per_seed = saved.get("per_seed", {})

    def save_seed(seed):
        def save(results):
            per_seed[str(seed)] = results
            write_json(path, dict(setup, seeds=list(seeds), per_seed=per_seed))
        return save

    for seed in seeds:
        done = per_seed.get(str(seed), {})
        if all(v in done for v in variants) and "untrained" in done:
            continue
        per_seed[str(seed)] = run_seed(settings, config, seed, variants, out, done, save_seed(seed))
    summary = summarise(per_seed, seeds, variants)
    result = dict(setup, **summary)
    write_json(path, result)
    (out / "compare.md").write_text(format_comparison(result))
    plot_paired(result, out / "compare.png")
    plot_curves(result, out / "compare_curves.png")
    return result


def moving_average(values: Sequence[float], window: int = REWARD_WINDOW) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def steps_to_reward(per_seed: dict, seeds: Sequence[int], variants: Sequence[str]) -> dict:
    """How many steps each variant needs to reach a fixed training reward.

    The target of a seed is the highest moving-average reward that every variant of that seed reaches (the
    smallest of their peaks), so each variant has a step count: the first step whose moving average reaches it.
    Returns ``{"window", "per_seed": {seed: {"target", VARIANT: steps}}, "mean": {VARIANT: steps}, "paired":
    {"ospo-grpo": t interval, ...}}``.
    """
    rows = {}
    for seed in (str(s) for s in seeds):
        smooth = {v: moving_average(per_seed[seed][v]["rewards"]) for v in variants}
        target = min(max(curve) for curve in smooth.values())
        rows[seed] = dict(target=target, **{v: 1 + next(i for i, r in enumerate(smooth[v]) if r >= target)
                                             for v in variants})
    paired = {f"{a}-{b}": t_interval([rows[k][a] - rows[k][b] for k in rows])
              for a, b in PAIRS if a in variants and b in variants}
    return dict(window=REWARD_WINDOW, per_seed=rows, mean={v: statistics.fmean(r[v] for r in rows.values())
                                                           for v in variants}, paired=paired)


def summarise(per_seed: dict, seeds: Sequence[int], variants: Sequence[str]) -> dict:
    """``{"seeds", "variants", "per_seed", "means", "paired", "power", "steps_to_reward"}``:

    - ``means[policy][metric]``: mean and std over seeds of every policy (baselines included);
    - ``paired["ospo-grpo"][metric]``: ``{"mean", "ci95", "sd", "n", "per_seed"}``, the t interval over seeds
      of the per-seed differences (likewise ``"ospo-shuffled"``);
    - ``power``: for the primary metric of each pair, the seeds a +0.05 difference needs at the measured
      spread and the difference the seeds used can detect (80% power, two-sided 5%);
    - ``steps_to_reward``: see :func:`steps_to_reward`.
    """
    keys = [str(s) for s in seeds]
    policies = list(dict.fromkeys(p for k in keys for p in per_seed[k]))
    means = {}
    for policy in policies:
        rows = [per_seed[k][policy]["metrics"] for k in keys if policy in per_seed[k]]
        means[policy] = {m: dict(mean=statistics.fmean(r[m] for r in rows),
                                 std=statistics.stdev([r[m] for r in rows]) if len(rows) > 1 else 0.0)
                         for m in METRICS + HINT_METRICS if all(m in r for r in rows)}
    paired, power = {}, {}
    for a, b in PAIRS:
        if a not in variants or b not in variants:
            continue
        name = f"{a}-{b}"
        paired[name] = {}
        for metric in METRICS + HINT_METRICS:
            if not all(metric in per_seed[k][v]["metrics"] for k in keys for v in (a, b)):
                continue  # a hint metric of a comparison recorded without it
            diffs = [per_seed[k][a]["metrics"][metric] - per_seed[k][b]["metrics"][metric] for k in keys]
            paired[name][metric] = dict(t_interval(diffs), per_seed=diffs)
        sd = paired[name][METRICS[0]]["sd"]
        if len(keys) >= 2 and sd > 0:
            power[name] = dict(metric=METRICS[0], sd=sd, target=TARGET_DIFFERENCE,
                               seeds_needed=seeds_needed(sd, TARGET_DIFFERENCE),
                               detectable=detectable_difference(sd, len(keys)))
    return dict(seeds=list(seeds), variants=list(variants), per_seed=per_seed, means=means, paired=paired, power=power,
                steps_to_reward=steps_to_reward(per_seed, seeds, variants))


def format_comparison(result: dict) -> str:
    """compare.md: means per policy, paired differences with t intervals, and the power line."""
    n = len(result["seeds"])
    columns = METRICS + tuple(m for m in HINT_METRICS if any(m in v for v in result["means"].values()))
    lines = [f"Test split, greedy answers; {n} seed(s). Every variant of a seed starts from the same policy, "
             "split, pools and sampling seed.", "",
             "| policy | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for policy, metrics in result["means"].items():
        cells = [f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" if m in metrics else "-" for m in columns]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences over seeds (mean, 95% t interval):", "",
              "| difference | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, metrics in result["paired"].items():
        cells = [_mean_and_interval(metrics[m], ".4f") if m in metrics else "-" for m in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, p in result["power"].items():
        lines.append(f"\nPower ({name}, {p['metric']}): the per-seed differences have sd {p['sd']:.4f}; "
                     f"detecting {p['target']:+.2f} (80% power, two-sided 5%) needs {p['seeds_needed']} seeds; "
                     f"{n} seeds detect {p['detectable']:.4f}.")
    reach = result["steps_to_reward"]
    lines += ["", f"Steps to reach the highest training reward (moving average over {reach['window']} steps) that "
              "every variant of a seed reaches:", "",
              "| seed | target | " + " | ".join(result["variants"]) + " |",
              "|---|---|" + "---|" * len(result["variants"])]
    for seed, row in reach["per_seed"].items():
        lines.append(f"| {seed} | {row['target']:.4f} | " + " | ".join(str(row[v]) for v in result["variants"]) + " |")
    lines.append("| mean | | " + " | ".join(f"{reach['mean'][v]:.1f}" for v in result["variants"]) + " |")
    for name, d in reach["paired"].items():
        lines.append(f"\n{name}, steps: {_mean_and_interval(d, '.1f')}")
    return "\n".join(lines) + "\n"


def _mean_and_interval(d: dict, spec: str) -> str:
    """``+m [lo, hi]``, or ``+m (one seed, no interval)``."""
    lo, hi = d["ci95"]
    if lo is None:
        return f"{d['mean']:+{spec}} (one seed, no interval)"
    return f"{d['mean']:+{spec}} [{lo:+{spec}}, {hi:+{spec}}]"


def plot_paired(result: dict, path: Path) -> None:
    """compare.png: each paired difference with its 95% t interval and the per-seed points, per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["paired"])
    if not names:  # fewer than two of the paired variants ran: nothing to draw
        path.unlink(missing_ok=True)
        return
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        for i, name in enumerate(names):
            d = result["paired"][name][metric]
            lo, hi = d["ci95"]
            spread = None if lo is None else [[d["mean"] - lo], [hi - d["mean"]]]  # one seed: the mean alone
            ax.errorbar([i], [d["mean"]], yerr=spread, fmt="o", capsize=4, color="tab:blue")
            ax.scatter(np.full(len(d["per_seed"]), i + 0.15), d["per_seed"], s=10, color="tab:gray")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(metric, fontsize=9)
    axes[0][0].set_ylabel("paired difference (95% t interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(result: dict, path: Path) -> None:
    """compare_curves.png: per variant, the mean over seeds of the training reward (moving average) and of
    the validation NDCG@10 against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for seed in result["per_seed"].values() for r in seed.values() if r.get("rewards")]
    if not runs:
        return
    fig, (reward_ax, ndcg_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant in result["variants"]:
        records = [result["per_seed"][str(s)][variant] for s in result["seeds"]]
        length = min(len(r["rewards"]) for r in records)
        rewards = np.mean([moving_average(r["rewards"][:length]) for r in records], axis=0)
        reward_ax.plot(np.arange(1, length + 1), rewards, label=variant)
        points = min(len(r["validation"]) for r in records)
        steps = [p[0] for p in records[0]["validation"][:points]]
        ndcg = np.mean([[p[1] for p in r["validation"][:points]] for r in records], axis=0)
        ndcg_ax.plot(steps, ndcg, marker="o", label=variant)
    n = len(result["seeds"])
    reward_ax.set(xlabel="step", ylabel=f"training reward (moving average of {REWARD_WINDOW})",
                  title=f"training reward, mean of {n} seeds")
    ndcg_ax.set(xlabel="step", ylabel="validation NDCG@10 (dense, greedy)",
                title=f"validation NDCG@10, mean of {n} seeds")
    reward_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
