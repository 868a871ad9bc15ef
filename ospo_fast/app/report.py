"""A run folder's report: ``report.md``, the curves (``reward.png``, ``ndcg.png``, ``format.png``) and
``attributions.html``."""

from __future__ import annotations

import statistics
from pathlib import Path

from .. import defaults
from ..attribution import OwenAttributor
from ..trainer import METRICS, read_metrics
from .evaluation import POLICIES, format_table, generate_answers, request_of


def write_attributions(out: Path, model, tokenizer, task, reward, count: int, max_new_tokens: int,
                       bf16: bool = False) -> None:
    """attributions.html: a few of the trained policy's answers, each segment coloured by its Owen value."""
    samples = task.samples[:count]
    completions = generate_answers(model, tokenizer, [s.prompt for s in samples], max_new_tokens, bf16=bf16)
    attributor = OwenAttributor(reward, method=defaults.ATTRIBUTION_METHOD, budget=defaults.BUDGET)
    attributions = attributor(completions, [s.owner for s in samples])
    body = "\n".join(
        f"<h3>{_escape(request_of(s))}</h3>{a.to_html()}" for s, a in zip(samples, attributions)
    )
    page = ("<html><head><meta charset='utf-8'><title>OSPO attributions</title></head><body style='max-width:60em'>"
            "<h2>Owen values of the trained policy's answers</h2><p>Red segments raised the retrieval reward (NDCG "
            "against the request's candidate pool), blue ones lowered it.</p>" + body + "</body></html>")
    (out / "attributions.html").write_text(page)


def plot_curves(out: Path) -> None:
    """reward.png (training reward per step, with a moving average) and ndcg.png (eval NDCG@10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics(out / METRICS)
    steps = [x for x in lines if "reward" in x]
    evals = [x for x in lines if "eval_ndcg@10" in x]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs, ys = [x["step"] for x in steps], [x["reward"] for x in steps]
        ax.plot(xs, ys, alpha=0.35, label="batch mean")
        window = max(1, len(ys) // 10)
        smooth = [statistics.fmean(ys[max(0, i - window + 1) : i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, label=f"moving average ({window})")
        ax.set(xlabel="step", ylabel="reward (NDCG, dense retriever)", title="training reward")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "reward.png", dpi=120)
        plt.close(fig)
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([x["step"] for x in evals], [x["eval_ndcg@10"] for x in evals], marker="o")
        ax.set(xlabel="step", ylabel="NDCG@10 (validation split, dense)", title="validation NDCG@10 (greedy)")
        fig.tight_layout()
        fig.savefig(out / "ndcg.png", dpi=120)
        plt.close(fig)
    steps = [x for x in steps if "format_rate" in x]
    if steps:  # a policy that stops closing its answers, or grows them, shows here first
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [x["step"] for x in steps]
        ax.plot(xs, [x["format_rate"] for x in steps], color="tab:green", label="format rate")
        ax.set(xlabel="step", ylabel="answers in the asked format", ylim=(-0.02, 1.02), title="format and length")
        twin = ax.twinx()
        twin.plot(xs, [x["completion_length"] for x in steps], color="tab:purple", label="completion length")
        twin.set_ylabel("completion tokens")
        fig.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "format.png", dpi=120)
        plt.close(fig)


def write_report(out: Path, summary: dict) -> None:
    """report.md: what was run, the test table of the three policies, paired differences, answer statistics,
    where the time went, the pools, plots and example answers."""
    cfg, settings = summary["config"], summary["settings"]
    mix = summary["pool_mix"]
    seconds = summary["step_seconds"]
    paired = summary["paired_ndcg10"]
    text = [
        f"# Run report: {cfg['mode']}" + (f" ({cfg['redistribution']})" if cfg["mode"] == "ospo" else ""),
        "",
        f"Policy `{settings['model']}`; {cfg['max_steps']} steps of {cfg['prompts_per_step']} prompts x "
        f"{cfg['group_size']} completions (temperature {cfg['temperature']}, at most {cfg['max_new_tokens']} "
        f"tokens), learning rate {cfg['learning_rate']}, bf16 {bool(cfg['bf16'])}, seed {cfg['seed']}. Training "
        f"took {summary['train_seconds']:.0f} s"
        + (f": {seconds['step']:.1f} s a step, of which generation {seconds['generation']:.1f} s, rewards and "
           f"attribution {seconds['attribution']:.1f} s, forward/backward and update {seconds['optimise']:.1f} s."
           if seconds else "."),
        "",
        f"Prompts: {summary['splits']['train']} train, {summary['splits']['validation']} validation (the curve "
        f"below), {summary['splits']['test']} test (the tables). Each request is ranked against a pool of "
        f"candidates: its judged product and negatives, {mix['neighbour']:.0%} of them nearest neighbours of the "
        f"judged product by character n-gram TF-IDF (a retriever used nowhere else) and {mix['random']:.0%} random"
        + (f"; {mix['same_category']:.1%} share the judged product's category (random items: "
           f"{mix['same_category_random']:.1%})" if mix.get("same_category") is not None else "")
        + f"; mean n-gram similarity to the judged product {mix['similarity_negatives']:.3f} (random items "
        f"{mix['similarity_random']:.3f}).",
        "",
        "## Summary",
        "",
        *summary_lines(summary),
        "",
        "## Test split, greedy answers",
        "",
        "`dense` is the training retriever (all-MiniLM-L6-v2); `bm25` and `lsa` (fitted on the training items "
        "only) were never seen in training. `copy request` uses the request verbatim as the query; `untrained` "
        "is the policy before RL, with the same prompt.",
        "",
        format_table(summary["policies"]),
        "",
        "Paired differences of NDCG@10 over the test prompts (mean, 95% bootstrap interval, prompts won / tied "
        "/ lost):",
        "",
        "| retriever | comparison | mean | 95% interval | won / tied / lost |",
        "|---|---|---|---|---|",
        *[f"| {r} | {name} | {d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | "
          f"{d['wins']} / {d['ties']} / {d['losses']} |" for r, table in paired.items() for name, d in table.items()],
        "",
        *format_lines(out, summary["answer_stats"]),
        "![reward](reward.png) ![ndcg](ndcg.png) ![format](format.png)",
        "",
        "Attributions of a few answers: [attributions.html](attributions.html).",
        "",
        "## Example answers (test split)",
        "",
        "| request | untrained | trained |",
        "|---|---|---|",
    ]
    for before, after in zip(summary["examples"]["untrained"], summary["examples"]["trained"]):
        text.append(f"| {_cell(before['request'])} | {_cell(before['completion'])} | {_cell(after['completion'])} |")
    (out / "report.md").write_text("\n".join(text) + "\n")


def summary_lines(summary: dict) -> list[str]:
    """Where the trained policy stands, in a few sentences computed from the results (dense NDCG@10)."""
    ndcg = {p: summary["policies"][p]["dense"]["ndcg@10"] for p in POLICIES}
    stats = summary["answer_stats"]
    lines = []
    for other in ("untrained", "copy request"):
        d = summary["paired_ndcg10"]["dense"][f"trained - {other}"]
        verdict = ("better" if d["ci95"][0] > 0 else "worse" if d["ci95"][1] < 0 else "not distinguishable")
        lines.append(f"- Against `{other}` ({ndcg[other]:.3f}), the trained policy ({ndcg['trained']:.3f}) is "
                     f"{verdict}: {d['mean']:+.3f}, 95% interval [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
                     f"{d['wins']} prompts won, {d['losses']} lost, {d['ties']} tied.")
    lines.append(f"- Segments per answer {stats['untrained']['segments_per_answer']:.1f} → "
                 f"{stats['trained']['segments_per_answer']:.1f} (the request itself: "
                 f"{stats['copy request']['segments_per_answer']:.1f}); answers that repeat themselves "
                 f"{stats['untrained']['repetition_rate']:.0%} → {stats['trained']['repetition_rate']:.0%}; format "
                 f"rate {stats['untrained']['format_rate']:.0%} → {stats['trained']['format_rate']:.0%}.")
    return lines


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("\n", " ⏎ ").replace("`", "'") + "`"


def format_lines(out: Path, stats: dict) -> list[str]:
    """The report's answer statistics for each evaluated policy, and the format rate and length of the sampled
    completions of the first and last training steps."""
    lines = ["| policy | format rate | segments per answer | repeats itself | completion tokens |",
             "|---|---|---|---|---|"]
    for policy, f in stats.items():
        tokens = f"{f['completion_tokens']:.1f}" if "completion_tokens" in f else "-"
        lines.append(f"| {policy} | {f['format_rate']:.3f} | {f['segments_per_answer']:.2f} | "
                     f"{f['repetition_rate']:.3f} | {tokens} |")
    lines += ["", "Format: one line of at most 32 words, or a closed `<answer>` for a policy that writes tags. "
              "Repeats itself: a phrase twice or a word three times.", ""]
    steps = [x for x in read_metrics(out / METRICS) if "format_rate" in x]
    if steps:
        n = min(10, len(steps))
        first, last = steps[:n], steps[-n:]
        rate = [statistics.fmean(s["format_rate"] for s in part) for part in (first, last)]
        length = [statistics.fmean(s["completion_length"] for s in part) for part in (first, last)]
        reward = [statistics.fmean(s["reward"] for s in part) for part in (first, last)]
        lines += [f"Sampled completions in training (mean of the first and last {n} steps): reward {reward[0]:.3f} "
                  f"→ {reward[1]:.3f}, format rate {rate[0]:.3f} → {rate[1]:.3f}, completion length "
                  f"{length[0]:.1f} → {length[1]:.1f} tokens.", ""]
    return lines


def _escape(text: str) -> str:
    import html

    return html.escape(text)
