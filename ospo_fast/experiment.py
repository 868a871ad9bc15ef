"""The generative-search experiments behind ``ospo-fast train``, ``eval`` and ``compare``.

A run: a task (the shipped ESCI sample by default, or the official ESCI / H&M files), a policy (a small
causal LM built from a config with a tokenizer trained on the task's texts, or any Hugging Face causal
LM), a short supervised warm start that teaches the answer format, then OSPO (or GRPO) training against
the dense MiniLM retriever, and an evaluation of the policy's queries with the training retriever and with
retrievers it never saw (BM25, and an LSA encoder fitted on the catalogue).

A run folder holds: ``metrics.jsonl`` (one line per step, and eval lines), ``checkpoint.pt``, ``policy/``
(the final model and tokenizer), ``eval.json``, ``report.md``, ``reward.png``, ``ndcg.png`` and
``attributions.html``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from . import data as data_module
from .attribution import OwenAttributor
from .data.prompts import extract_answer, follows_format
from .policy import build_tokenizer, load_policy, prompt_text, tiny_causal_lm
from .rewards import BM25Reward, DenseRetrievalReward, LSAEncoder, ranking_metrics
from .trainer import METRICS, OSPOConfig, OSPOTrainer, supervised_warm_start

KS = (10, 20, 50, 100)


@dataclass
class RunSettings:
    """What a run needs beyond :class:`~ospo_fast.trainer.OSPOConfig`."""

    model: str | None = None  # None: a small LM built from a config; else a hub name or a local path
    task: str = "default"  # "default", "esci" or "hm"
    esci_examples: str | None = None
    esci_products: str | None = None
    hm_articles: str | None = None
    hm_customers: str | None = None
    hm_transactions: str | None = None
    max_samples: int | None = None
    eval_fraction: float = 0.15
    warm_start_steps: int = 400
    warm_start_lr: float = 1e-3
    warm_start_extra: int = 4000  # pseudo-requests from the catalogue (see warm_start_pairs)
    hidden_size: int = 256
    num_layers: int = 4
    vocab_size: int = 2048
    eval_every: int = 25
    eval_samples: int | None = None  # cap on evaluation prompts (None: the whole eval split)
    attribution_examples: int = 6


# ----------------------------------------------------------------------------------------------------
# Task and policy


def load_task(settings: RunSettings, seed: int = 0):
    """The task of a run, split into (train, eval) with a seeded shuffle."""
    if settings.task == "default":
        task = data_module.default_task(seed=seed)
    elif settings.task == "esci":
        if not (settings.esci_examples and settings.esci_products):
            raise ValueError("task='esci' needs --esci-examples and --esci-products (the official parquet files)")
        frame = data_module.load_esci(settings.esci_examples, settings.esci_products)
        task = data_module.esci_task(frame, seed=seed, max_samples=settings.max_samples)
    elif settings.task == "hm":
        if not (settings.hm_articles and settings.hm_transactions):
            raise ValueError("task='hm' needs --hm-articles and --hm-transactions (and optionally --hm-customers)")
        hm = data_module.load_hm(settings.hm_articles, settings.hm_customers, settings.hm_transactions)
        task = data_module.hm_task(hm, seed=seed, max_samples=settings.max_samples)
    else:
        raise ValueError(f"task: expected 'default', 'esci' or 'hm', got {settings.task!r}")
    return task.split(eval_fraction=settings.eval_fraction, seed=seed)


def request_of(sample) -> str:
    """What the user asked (ESCI: the under-specified query; otherwise the prompt's text)."""
    return sample.query or sample.text


def warm_start_target(sample) -> str:
    """The warm start's completion: think about the request, then use it as the query (the format, not the
    solution: what a better query looks like is left to RL)."""
    request = request_of(sample)
    return f"<think>{request}</think><answer>{request}</answer>"


def warm_start_pairs(task, extra: int, seed: int = 0) -> tuple[list, list[str]]:
    """(prompts, targets) for the warm start: the task's own requests, plus ``extra`` pseudo-requests cut from
    the catalogue's item texts (2-6 consecutive words), in the task's prompt format, so that a small model
    learns to write the format and to carry a request's words into its query, not to memorise a few pairs."""
    import numpy as np

    prompts = list(task.prompts)
    targets = [warm_start_target(s) for s in task.samples]
    rng = np.random.Generator(np.random.PCG64(seed))
    template = task.samples[0]
    request = request_of(template)
    words = [re.findall(r"[\w'-]+", item.lower())[:12] for item in task.items]
    words = [w for w in words if len(w) >= 2]
    for _ in range(extra if words else 0):
        w = words[int(rng.integers(len(words)))]
        n = int(rng.integers(2, min(6, len(w)) + 1))
        start = int(rng.integers(len(w) - n + 1))
        pseudo = " ".join(w[start : start + n])
        prompts.append([{**m, "content": m["content"].replace(request, pseudo)} for m in template.prompt])
        targets.append(f"<think>{pseudo}</think><answer>{pseudo}</answer>")
    return prompts, targets


def make_policy(settings: RunSettings, task, seed: int = 0):
    """(model, tokenizer): a small local LM with a tokenizer trained on the task's texts, or a hub/local model."""
    if settings.model:
        return load_policy(settings.model)
    corpus = list(task.items) + [s.text for s in task.samples] + [warm_start_target(s) for s in task.samples]
    tokenizer = build_tokenizer(corpus, vocab_size=settings.vocab_size)
    model = tiny_causal_lm(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers, seed=seed)
    return model, tokenizer


def warm_start(model, tokenizer, settings: RunSettings, task, seed: int, progress: bool) -> list[float]:
    prompts, targets = warm_start_pairs(task, settings.warm_start_extra, seed)
    return supervised_warm_start(model, tokenizer, prompts, targets, steps=settings.warm_start_steps,
                                 learning_rate=settings.warm_start_lr, seed=seed, progress=progress)


def retrievers(task, device=None) -> dict:
    """The training retriever ("dense": MiniLM) and the out-of-distribution ones ("bm25", "lsa")."""
    return {
        "dense": DenseRetrievalReward(task.items, task.pools, task.gains, device=device),
        "bm25": BM25Reward(task.items, task.pools, task.gains),
        "lsa": DenseRetrievalReward(task.items, task.pools, task.gains, encoder=LSAEncoder(task.items), cache_dir=False),
    }


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
    """Greedy completions of ``prompts`` (decoded, special tokens removed)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for s in range(0, len(prompts), batch_size):
        texts = [prompt_text(tokenizer, p) for p in prompts[s : s + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def pool_scores(reward, texts: list[str], owners: torch.Tensor) -> torch.Tensor:
    """Each retriever's scores of its owners' pools: dense rewards embed, BM25 scores the text."""
    if isinstance(reward, DenseRetrievalReward):
        return reward.pool_scores(reward.encoder.encode(texts).to(reward.device), owners.to(reward.device)).cpu()
    return reward.pool_scores(texts, owners)


def evaluate_queries(queries: list[str], owners: Sequence[int], scorers: dict, ks=KS) -> dict:
    """Mean NDCG, recall and MRR at each k for every retriever: ``{retriever: {"ndcg@10": ..., ...}}``."""
    own = torch.as_tensor(list(owners), dtype=torch.long)
    table = {}
    for name, reward in scorers.items():
        scores = pool_scores(reward, queries, own)
        gains = reward.pool_gains.cpu()[own]
        valid = reward.pool_valid.cpu()[own]
        metrics = ranking_metrics(scores.float(), gains, ks=ks, valid=valid)
        table[name] = {k: float(v.float().mean()) for k, v in metrics.items()}
    return table


def evaluate_policy(model, tokenizer, task, scorers: dict, max_new_tokens: int = 48, ks=KS, limit: int | None = None) -> dict:
    samples = task.samples[:limit] if limit else task.samples
    completions = generate_answers(model, tokenizer, [s.prompt for s in samples], max_new_tokens)
    queries = [extract_answer(c) for c in completions]
    table = evaluate_queries(queries, [s.owner for s in samples], scorers, ks)
    lengths = [len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
    form = dict(format_rate=statistics.fmean(map(follows_format, completions)), completion_tokens=statistics.fmean(lengths))
    examples = [dict(request=request_of(s), completion=c) for s, c in zip(samples[:5], completions)]
    return dict(table=table, format=form, examples=examples)


def format_table(results: dict[str, dict], ks=KS) -> str:
    """A Markdown table: one row per (policy, retriever), NDCG/recall/MRR at each k."""
    header = "| policy | retriever | " + " | ".join(f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in ks) + " |"
    lines = [header, "|" + "---|" * (2 + 3 * len(ks))]
    for policy, table in results.items():
        for retriever, metrics in table.items():
            cells = [f"{metrics[f'{m}@{k}']:.4f}" for m in ("ndcg", "recall", "mrr") for k in ks]
            lines.append(f"| {policy} | {retriever} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# One run: warm start, training, evaluation, report


def run(settings: RunSettings, config: OSPOConfig, resume: bool = False) -> dict:
    """Warm start (skipped when resuming), train, evaluate, and write the run folder. Returns the eval results."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    train_task, eval_task = load_task(settings, seed=config.seed)
    model, tokenizer = make_policy(settings, train_task, seed=config.seed)
    scorers = retrievers(train_task)
    reward = scorers["dense"]
    limit = settings.eval_samples
    results = {}
    if not resume and settings.warm_start_steps > 0:
        warm_start(model, tokenizer, settings, train_task, config.seed, config.progress)
        results["warm start"] = evaluate_policy(model, tokenizer, eval_task, scorers, config.max_new_tokens, limit=limit)
        _write_json(out / "warm_start_eval.json", results["warm start"])
    elif resume and (out / "warm_start_eval.json").is_file():
        results["warm start"] = json.loads((out / "warm_start_eval.json").read_text())

    def periodic_eval(trainer, step, metrics):
        if step % settings.eval_every == 0 or step == config.max_steps:
            result = evaluate_policy(trainer.model, tokenizer, eval_task, {"dense": reward}, config.max_new_tokens,
                                     ks=(10,), limit=limit)
            line = {"step": step, "eval_ndcg@10": result["table"]["dense"]["ndcg@10"],
                    **{f"eval_{k}": v for k, v in result["format"].items()}}
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(line) + "\n")

    trainer = OSPOTrainer(model, tokenizer, reward, train_task.prompts, train_task.owners, config, callbacks=[periodic_eval])
    start = time.perf_counter()
    trainer.train(resume=resume)
    train_seconds = time.perf_counter() - start
    label = config.mode if config.mode == "grpo" else f"ospo ({config.redistribution})"
    results[label] = evaluate_policy(trainer.model, tokenizer, eval_task, scorers, config.max_new_tokens, limit=limit)
    trainer.model.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")

    summary = dict(settings=asdict(settings), config=asdict(config), train_seconds=train_seconds,
                   results={k: v["table"] for k, v in results.items()}, format={k: v.get("format") for k, v in results.items()},
                   examples={k: v["examples"] for k, v in results.items()})
    _write_json(out / "eval.json", summary)
    plot_curves(out)
    write_attributions(out, trainer.model, tokenizer, eval_task, reward, settings.attribution_examples, config.max_new_tokens)
    write_report(out, summary)
    return summary


def write_attributions(out: Path, model, tokenizer, task, reward, count: int, max_new_tokens: int) -> None:
    """attributions.html: a few of the trained policy's answers, each segment coloured by its Owen value."""
    samples = task.samples[:count]
    completions = generate_answers(model, tokenizer, [s.prompt for s in samples], max_new_tokens)
    attributions = OwenAttributor(reward, method="auto", budget=64)(completions, [s.owner for s in samples])
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

    lines = [json.loads(x) for x in (out / METRICS).read_text().splitlines() if x.strip()]
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
    warm = out / "warm_start_eval.json"
    if warm.is_file():  # the warm start is the curve's step 0
        evals = [{"step": 0, "eval_ndcg@10": json.loads(warm.read_text())["table"]["dense"]["ndcg@10"]}] + evals
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([x["step"] for x in evals], [x["eval_ndcg@10"] for x in evals], marker="o")
        ax.set(xlabel="step", ylabel="NDCG@10 (eval split, dense)", title="held-out NDCG@10")
        fig.tight_layout()
        fig.savefig(out / "ndcg.png", dpi=120)
        plt.close(fig)
    steps = [x for x in steps if "format_rate" in x]
    if steps:  # a policy that stops closing its answers, or grows them, shows here first
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [x["step"] for x in steps]
        ax.plot(xs, [x["format_rate"] for x in steps], color="tab:green", label="format rate")
        ax.set(xlabel="step", ylabel="answers closed by </answer>", ylim=(-0.02, 1.02), title="format and length")
        twin = ax.twinx()
        twin.plot(xs, [x["completion_length"] for x in steps], color="tab:purple", label="completion length")
        twin.set_ylabel("completion tokens")
        fig.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "format.png", dpi=120)
        plt.close(fig)


def write_report(out: Path, summary: dict) -> None:
    cfg = summary["config"]
    text = [
        f"# Run report: {cfg['mode']}" + (f" ({cfg['redistribution']})" if cfg["mode"] == "ospo" else ""),
        "",
        f"{cfg['max_steps']} steps of {cfg['prompts_per_step']} prompts x {cfg['group_size']} completions, "
        f"learning rate {cfg['learning_rate']}, seed {cfg['seed']}; training took {summary['train_seconds']:.0f} s.",
        "",
        "## Evaluation (held-out prompts, greedy answers)",
        "",
        "`dense` is the training retriever (all-MiniLM-L6-v2); `bm25` and `lsa` were never seen in training.",
        "",
        format_table(summary["results"]),
        "",
        *format_lines(out, summary.get("format", {})),
        "![reward](reward.png) ![ndcg](ndcg.png) ![format](format.png)",
        "",
        "Attributions of a few answers: [attributions.html](attributions.html).",
        "",
        "## Example answers",
        "",
    ]
    for policy, examples in summary["examples"].items():
        text.append(f"**{policy}**")
        text += [f"- `{e['request']}` → `{e['completion']}`" for e in examples[:3]]
        text.append("")
    (out / "report.md").write_text("\n".join(text))


def format_lines(out: Path, forms: dict) -> list[str]:
    """The report's format section: greedy answers closed by ``</answer>`` and their length for each
    evaluated policy, and the same for the sampled completions of the first and last training steps."""
    lines = ["| policy | format rate | completion tokens |", "|---|---|---|"]
    lines += [f"| {p} | {f['format_rate']:.3f} | {f['completion_tokens']:.1f} |" for p, f in forms.items() if f]
    lines.append("")
    steps = [json.loads(x) for x in (out / METRICS).read_text().splitlines() if '"format_rate"' in x]
    if steps:
        n = min(10, len(steps))
        first, last = steps[:n], steps[-n:]
        rate = [statistics.fmean(s["format_rate"] for s in part) for part in (first, last)]
        length = [statistics.fmean(s["completion_length"] for s in part) for part in (first, last)]
        lines += [f"Sampled completions in training (mean of the first and last {n} steps): format rate "
                  f"{rate[0]:.3f} → {rate[1]:.3f}, completion length {length[0]:.1f} → {length[1]:.1f} tokens.", ""]
    return lines


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _escape(text: str) -> str:
    import html

    return html.escape(text)


# ----------------------------------------------------------------------------------------------------
# OSPO vs GRPO vs the warm start alone, over seeds


VARIANTS = ("grpo", "proportional", "rank", "hybrid")


def compare(settings: RunSettings, config: OSPOConfig, seeds: Sequence[int], variants: Sequence[str] = VARIANTS,
            output_dir: str = "runs/compare") -> dict:
    """Every variant from the same warm start of each seed, same steps; mean ± std over seeds of the eval
    metrics with the training retriever and the OOD ones. Writes compare.json, compare.md and compare.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        train_task, eval_task = load_task(settings, seed=seed)
        model, tokenizer = make_policy(settings, train_task, seed=seed)
        scorers = retrievers(train_task)
        warm_start(model, tokenizer, settings, train_task, seed, config.progress)
        warm = {k: v.clone() for k, v in model.state_dict().items()}
        table = evaluate_policy(model, tokenizer, eval_task, scorers, config.max_new_tokens, limit=settings.eval_samples)["table"]
        rows.append(dict(seed=seed, variant="warm start", table=table))
        for variant in variants:
            model.load_state_dict(warm)
            run_config = replace(
                config, seed=seed, output_dir=str(out / f"seed{seed}-{variant}"),
                mode="grpo" if variant == "grpo" else "ospo",
                redistribution=config.redistribution if variant == "grpo" else variant,
            )
            trainer = OSPOTrainer(model, tokenizer, scorers["dense"], train_task.prompts, train_task.owners, run_config)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            table = evaluate_policy(trainer.model, tokenizer, eval_task, scorers, config.max_new_tokens, limit=settings.eval_samples)["table"]
            rows.append(dict(seed=seed, variant=variant, table=table, train_seconds=seconds))
            _write_json(out / "compare.json", dict(settings=asdict(settings), config=asdict(config), rows=rows))
    summary = summarise(rows)
    _write_json(out / "compare.json", dict(settings=asdict(settings), config=asdict(config), rows=rows, summary=summary))
    (out / "compare.md").write_text(format_comparison(summary, len(seeds)))
    plot_comparison(summary, out / "compare.png")
    return summary


def summarise(rows: list[dict], metrics=("ndcg@10", "ndcg@100", "recall@10", "mrr@10")) -> dict:
    """{variant: {retriever: {metric: (mean, std)}}} over seeds."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        tables = [r["table"] for r in rows if r["variant"] == variant]
        out[variant] = {
            retriever: {
                m: (statistics.fmean(t[retriever][m] for t in tables),
                    statistics.stdev([t[retriever][m] for t in tables]) if len(tables) > 1 else 0.0)
                for m in metrics
            }
            for retriever in tables[0]
        }
    return out


def format_comparison(summary: dict, num_seeds: int) -> str:
    retrievers_ = list(next(iter(summary.values())))
    metrics = list(next(iter(next(iter(summary.values())).values())))
    header = "| variant | " + " | ".join(f"{r} {m}" for r in retrievers_ for m in metrics) + " |"
    lines = [f"Mean ± std over {num_seeds} seeds (held-out prompts, greedy answers).", "", header,
             "|" + "---|" * (1 + len(retrievers_) * len(metrics))]
    for variant, table in summary.items():
        cells = [f"{table[r][m][0]:.4f} ± {table[r][m][1]:.4f}" for r in retrievers_ for m in metrics]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(summary: dict, path: Path, metric: str = "ndcg@10") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary)
    retrievers_ = list(summary[variants[0]])
    width = 0.8 / len(retrievers_)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for j, r in enumerate(retrievers_):
        means = [summary[v][r][metric][0] for v in variants]
        stds = [summary[v][r][metric][1] for v in variants]
        ax.bar([i + j * width for i in range(len(variants))], means, width, yerr=stds, capsize=3,
               label=r + (" (training retriever)" if r == "dense" else " (unseen)"))
    ax.set_xticks([i + width * (len(retrievers_) - 1) / 2 for i in range(len(variants))], variants)
    ax.set(ylabel=f"{metric} (mean ± std over seeds)", title="OSPO vs GRPO vs the warm start")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
