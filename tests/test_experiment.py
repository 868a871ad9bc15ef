"""The command line and the experiment workflows, end to end on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

import ospo_fast as of
from ospo_fast import cli
from ospo_fast.experiment import evaluate_queries, retrievers, summarise, warm_start_pairs

TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--warm-start-steps", "3",
        "--eval-every", "1", "--eval-samples", "4", "--save-steps", "1"]


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
    assert set(summary["results"]) == {"warm start", "ospo (proportional)"}
    for policy, form in summary["format"].items():  # greedy answers: closed by </answer>, and their length
        assert 0 <= form["format_rate"] <= 1 and form["completion_tokens"] > 0, policy
    report = (out / "report.md").read_text()
    assert "| ospo (proportional) | " in report.split("| policy | format rate |")[1]
    assert "Sampled completions in training" in report
    assert set(summary["results"]["warm start"]) == {"dense", "bm25", "lsa"}
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "format rate (answers closed by </answer>)" in printed


def test_train_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    cli.main(["train", "--output", str(out), *TINY])
    args = [a if a != "2" or i != 1 else "3" for i, a in enumerate(TINY)]  # --steps 3
    assert cli.main(["train", "--output", str(out), "--resume", *args]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "reward" in json.loads(x)]
    assert steps == [1, 2, 3]


def test_eval_of_a_run_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--output", str(out), *TINY, "--mode", "grpo"])
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(out), "--eval-samples", "3", "--max-new-tokens", "6", "--json", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    assert "| policy | dense |" in printed and "| policy | bm25 |" in printed and "| policy | lsa |" in printed
    assert "ndcg@100" in json.loads((tmp_path / "e.json").read_text())["table"]["dense"]


def test_attribute_prints_segment_values_and_writes_html(tmp_path, capsys):
    page = tmp_path / "a.html"
    assert cli.main(["attribute", "<answer>mama koala plush toy. grey</answer>", "--request", "mama koala", "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    assert "koala" in printed and "sum of Owen values" in printed
    assert "Owen value" in page.read_text()


def test_attribute_with_an_unknown_request_says_which_exist():
    with pytest.raises(SystemExit, match="no request 'no such request'"):
        cli.main(["attribute", "text", "--request", "no such request"])


def test_compare_reports_mean_and_std_over_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--output", str(out), "--seeds", "0", "1", "--variants", "grpo", "rank", *TINY]) == 0
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert list(summary) == ["warm start", "grpo", "rank"]
    assert (out / "compare.png").is_file() and "±" in (out / "compare.md").read_text()


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
    relevant = [task.items[task.pools[s.owner][max(range(len(task.gains[s.owner])), key=task.gains[s.owner].__getitem__)]] for s in samples]
    good = evaluate_queries(relevant, owners, scorers)
    empty = evaluate_queries([""] * len(samples), owners, scorers)
    for name in scorers:
        assert good[name]["ndcg@10"] > empty[name]["ndcg@10"]
        assert 0.0 <= good[name]["recall@100"] <= 1.0


def test_summarise_gives_mean_and_std():
    rows = [dict(variant="a", table={"dense": {"ndcg@10": x, "ndcg@100": x, "recall@10": x, "mrr@10": x}}) for x in (0.2, 0.4)]
    mean, std = summarise(rows)["a"]["dense"]["ndcg@10"]
    assert mean == pytest.approx(0.3) and std == pytest.approx(torch.tensor([0.2, 0.4]).std().item())
