"""The command line and the experiment workflows, end to end on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

import ospo_fast as of
from ospo_fast.app import cli
from ospo_fast.app.evaluation import evaluate_queries, retrievers
from ospo_fast.app.experiment import RunSettings, warm_start_pairs

TINY = ["--model", "tiny", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
        "--warm-start-steps", "3", "--eval-every", "1", "--eval-samples", "4", "--save-steps", "1"]


@pytest.fixture(scope="module")
def task():
    return of.data.default_task()


def test_train_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--output", str(out), *TINY]) == 0
    for name in ("metrics.jsonl", "checkpoint.pt", "eval.json", "report.md", "reward.png", "ndcg.png", "format.png",
                 "attributions.html"):
        assert (out / name).is_file(), name
    assert (out / "policy" / "config.json").is_file()
    summary = json.loads((out / "eval.json").read_text())
    # The layout other tools read: three policies, each with every retriever, a format rate each.
    assert list(summary["policies"]) == ["copy request", "untrained", "trained"]
    for policy, table in summary["policies"].items():
        assert set(table) == {"dense", "bm25", "lsa"}, policy
        assert {"ndcg@10", "recall@100", "mrr@50"} <= set(table["dense"])
        assert 0 <= summary["format_rate"][policy] <= 1
    assert summary["num_eval_prompts"] == summary["splits"]["test"] == len(summary["answers"]["trained"])
    assert summary["format_rate"]["copy request"] == 1.0
    paired = summary["paired_ndcg10"]["dense"]["trained - untrained"]
    assert paired["wins"] + paired["ties"] + paired["losses"] == summary["num_eval_prompts"]
    assert paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1]
    assert abs(paired["mean"] - (summary["policies"]["trained"]["dense"]["ndcg@10"]
                                 - summary["policies"]["untrained"]["dense"]["ndcg@10"])) < 1e-6
    assert set(summary["step_seconds"]) == {"step", "generation", "attribution", "optimise"}
    assert summary["pool_mix"]["neighbour"] > 0.5
    report = (out / "report.md").read_text()
    assert "| copy request | dense |" in report and "| trained | lsa |" in report
    assert "trained - untrained" in report and "Sampled completions in training" in report
    assert "Against `untrained`" in report.split("## Summary")[1] and "Against `copy request`" in report
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "eval_ndcg@10" in lines[0]  # validation of the untrained policy first
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "trained - untrained" in printed and "a training step:" in printed


def test_train_refuses_to_overwrite_a_run_unless_asked(tmp_path):
    out = tmp_path / "run"
    cli.main(["train", "--output", str(out), *TINY])
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        cli.main(["train", "--output", str(out), *TINY])
    assert (out / "checkpoint.pt").read_bytes() == before
    assert cli.main(["train", "--output", str(out), "--overwrite", *TINY]) == 0


def test_fitted_parts_never_see_the_held_out_targets():
    from ospo_fast.app.experiment import RunSettings, load_task, training_items

    train, val, test = load_task(RunSettings(), seed=0)
    items = training_items(train, val, test)
    held = {train.items[i] for i in train.held_out_items(val, test)}
    assert held and not held & set(items)
    assert len(items) == len(train.items) - len(held)
    assert not {s.id for s in train.samples} & {s.id for s in test.samples}
    assert not {s.id for s in val.samples} & {s.id for s in test.samples}


def test_answer_statistics():
    from ospo_fast.app.evaluation import answer_stats, repeats_itself

    assert repeats_itself("mama koala, a gentle, a gentle")
    assert repeats_itself("camera camera camera")
    assert not repeats_itself("running shoes, lightweight, breathable mesh")
    stats = answer_stats(["red shoes, size 8", "<answer>x"], ["red shoes, size 8", "x"])
    assert stats == dict(format_rate=0.5, segments_per_answer=1.5, repetition_rate=0.0)


def test_paired_difference_interval_covers_the_mean():
    from ospo_fast.app.evaluation import paired_difference

    rng = torch.Generator().manual_seed(0)
    a = torch.rand(41, generator=rng).tolist()
    b = [x - 0.1 + 0.01 * (i % 3) for i, x in enumerate(a)]
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 41)
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1] and d["ci95"][0] > 0
    assert (d["wins"], d["ties"], d["losses"]) == (41, 0, 0)
    same = paired_difference(a, a)
    assert same["mean"] == 0 and same["ties"] == 41 and same["ci95"] == [0.0, 0.0]


def test_train_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    cli.main(["train", "--output", str(out), *TINY])
    args = [a if a != "2" or TINY[i - 1] != "--steps" else "3" for i, a in enumerate(TINY)]  # --steps 3
    assert cli.main(["train", "--output", str(out), "--resume", *args]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "reward" in json.loads(x)]
    assert steps == [1, 2, 3]


def test_eval_of_a_run_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--output", str(out), *TINY, "--mode", "grpo"])
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(out), "--eval-samples", "3", "--max-new-tokens", "6",
                     "--json", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    assert "| policy | dense |" in printed and "| policy | bm25 |" in printed and "| policy | lsa |" in printed
    assert "ndcg@100" in json.loads((tmp_path / "e.json").read_text())["table"]["dense"]


def test_attribute_prints_segment_values_and_writes_html(tmp_path, capsys):
    page = tmp_path / "a.html"
    assert cli.main(["attribute", "<answer>mama koala plush toy. grey</answer>", "--request", "mama koala",
                     "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    assert "koala" in printed and "sum of Owen values" in printed
    assert "Owen value" in page.read_text()


def test_attribute_with_an_unknown_request_says_which_exist():
    with pytest.raises(SystemExit, match="no request 'no such request'"):
        cli.main(["attribute", "text", "--request", "no such request"])


def test_compare_pairs_variants_within_a_seed_and_resumes(tmp_path, capsys, monkeypatch):
    import ospo_fast.app.comparison as comparison

    starts = []  # (seed, variant, initial weights, prompts) of every training run
    original = comparison.OSPOTrainer

    def recording_trainer(model, tokenizer, reward, prompts, owners, config, **kwargs):
        starts.append((config.seed, config.output_dir, {k: v.clone() for k, v in model.state_dict().items()},
                       list(map(str, prompts)), config.mode, config.credit))
        return original(model, tokenizer, reward, prompts, owners, config, **kwargs)

    monkeypatch.setattr(comparison, "OSPOTrainer", recording_trainer)
    out = tmp_path / "cmp"
    args = ["compare", "--output", str(out), "--seeds", "0", "1", "--variants", "grpo", "ospo", "shuffled", *TINY]
    assert cli.main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["seeds"] == [0, 1] and result["variants"] == ["grpo", "ospo", "shuffled"]
    assert set(result["per_seed"]["0"]) == {"copy request", "untrained", "grpo", "ospo", "shuffled"}
    # Within a seed: the same initial weights and prompts; only the advantages differ.
    for seed in (0, 1):
        runs = [s for s in starts if s[0] == seed]
        assert [(r[4], r[5]) for r in runs] == [("grpo", "owen"), ("ospo", "owen"), ("ospo", "shuffled")]
        for r in runs[1:]:
            assert r[3] == runs[0][3] and all(torch.equal(r[2][k], runs[0][2][k]) for k in r[2])
    # The paired differences are the per-seed differences, with a t interval over seeds.
    d = result["paired"]["ospo-grpo"]["dense ndcg@10"]
    per_seed = [result["per_seed"][k]["ospo"]["metrics"]["dense ndcg@10"]
                - result["per_seed"][k]["grpo"]["metrics"]["dense ndcg@10"] for k in ("0", "1")]
    assert d["per_seed"] == pytest.approx(per_seed) and d["mean"] == pytest.approx(sum(per_seed) / 2)
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert set(result["paired"]) == {"ospo-grpo", "ospo-shuffled"}
    assert (out / "compare.png").is_file() and "ospo-shuffled" in (out / "compare.md").read_text()
    # Every variant's validation curve starts at the same untrained policy and has a point per step (--eval-every 1).
    curves = [result["per_seed"]["0"][v]["validation"] for v in ("grpo", "ospo", "shuffled")]
    assert [[p[0] for p in c] for c in curves] == [[0, 1, 2]] * 3 and len({c[0][1] for c in curves}) == 1
    assert set(result["steps_to_reward"]["per_seed"]["0"]) == {"target", "grpo", "ospo", "shuffled"}
    assert (out / "compare_curves.png").is_file() and "Steps to reach" in (out / "compare.md").read_text()
    # Run again: everything is done, nothing is trained again.
    count = len(starts)
    assert cli.main(args) == 0 and len(starts) == count
    # Another seed continues the same comparison; other settings are refused.
    assert cli.main([*args[:5], "0", "1", "2", *args[6:]]) == 0 and len(starts) == count + 3
    with pytest.raises(ValueError, match="other settings"):
        cli.main([*args, "--lr", "0.5"])


def test_steps_to_reward_reads_the_moving_average_against_the_lowest_peak():
    from ospo_fast.app.comparison import moving_average, steps_to_reward

    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    flat, rising = [0.5] * 6, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    per_seed = {"0": {"grpo": {"rewards": flat}, "ospo": {"rewards": rising}}}
    reach = steps_to_reward(per_seed, [0], ["grpo", "ospo"])
    # Peaks of the 5-step moving averages: 0.5 (flat) and 0.6 (rising, at step 6); the target is 0.5. The flat
    # run is there at step 1, the rising one when its average first reaches 0.5: (0.2+0.4+0.6+0.8+1.0)/5 = 0.6
    # at step 6, (0+0.2+0.4+0.6+0.8)/5 = 0.4 at step 5.
    assert reach["per_seed"]["0"] == {"target": 0.5, "grpo": 1, "ospo": 6}
    assert reach["paired"]["ospo-grpo"]["mean"] == 5


def test_credit_task_compare_has_the_oracle_baseline(tmp_path):
    out = tmp_path / "credit"
    assert cli.main(["compare", "--task", "credit", "--output", str(out), "--seeds", "0", "--variants", "ospo",
                     *TINY]) == 0
    result = json.loads((out / "compare.json").read_text())
    seed = result["per_seed"]["0"]
    assert {"copy request", "request + true hints", "untrained", "ospo"} <= set(seed)
    # Keeping the true hints beats the request alone, on average over the test prompts.
    assert seed["request + true hints"]["metrics"]["dense ndcg@10"] > seed["copy request"]["metrics"]["dense ndcg@10"]
    assert result["paired"] == {} and result["power"] == {}
    # The hint mix of the answers is recorded: the oracle keeps every true hint and no decoy.
    assert seed["request + true hints"]["metrics"]["true hints kept"] == 1.0
    assert seed["request + true hints"]["metrics"]["decoys kept"] == 0.0
    assert 0.0 <= seed["ospo"]["metrics"]["true hints kept"] <= 1.0
    assert "| true hints kept | decoys kept |" in (out / "compare.md").read_text()


def test_warm_start_pairs_keep_the_prompt_format(task):
    prompts, targets = warm_start_pairs(task, extra=20, seed=0)
    assert len(prompts) == len(targets) == len(task.samples) + 20
    pseudo = targets[-1].split("<answer>")[1].split("</answer>")[0]
    assert pseudo in prompts[-1][-1]["content"]
    assert warm_start_pairs(task, extra=20, seed=0)[1] == targets


def test_perfect_queries_score_higher_than_empty_ones(task):
    samples = task.samples[:6]
    scorers = retrievers(task)
    owners = [s.owner for s in samples]
    relevant = [
        task.items[task.pools[s.owner][max(range(len(task.gains[s.owner])), key=task.gains[s.owner].__getitem__)]]
        for s in samples
    ]
    good = evaluate_queries(relevant, owners, scorers)
    empty = evaluate_queries([""] * len(samples), owners, scorers)
    for name in scorers:
        assert good[name]["ndcg@10"] > empty[name]["ndcg@10"]
        assert 0.0 <= good[name]["recall@100"] <= 1.0


def test_unknown_variant_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="variants: expected names from"):
        cli.main(["compare", "--output", str(tmp_path / "x"), "--variants", "grpo", "ppo", *TINY])
    assert not (tmp_path / "x").exists()


def test_warm_start_defaults_follow_the_model_and_task():
    tiny, pretrained = RunSettings(model="tiny"), RunSettings(model="some/pretrained")
    assert (tiny.warm_start_steps_or_default(), tiny.warm_start_lr_or_default(), tiny.warm_start_extra_or_default()) \
        == (400, 1e-3, 4000)
    assert (pretrained.warm_start_steps_or_default(), pretrained.warm_start_extra_or_default()) == (0, 0)
    assert RunSettings(model="some/pretrained", task="credit").warm_start_steps_or_default() == 12
    assert RunSettings(model="tiny", warm_start_steps=3, warm_start_lr=0.5).warm_start_lr_or_default() == 0.5
