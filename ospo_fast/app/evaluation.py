"""Evaluating answers and policies: the baselines' and the trained policy's answers scored by every retriever
(NDCG, recall, MRR at several cutoffs), answer statistics, paired differences and the results table."""

from __future__ import annotations

import re
import statistics
from typing import Sequence

import numpy as np
import torch

from .. import defaults
from ..data.prompts import extract_answer, follows_format
from ..policy import prompt_text
from ..rewards import BM25Reward, DenseRetrievalReward, LSAEncoder, ranking_metrics
from ..segment import Segmenter
from .stats import bootstrap_interval

KS = (10, 20, 50, 100)
#: The policies of every evaluation table, in order.
POLICIES = ("copy request", "untrained", "trained")


def request_of(sample) -> str:
    """What the user asked (ESCI: the under-specified query; otherwise the prompt's text)."""
    return sample.query or sample.text


def retrievers(task, fit_items: Sequence[str] | None = None, device=None) -> dict:
    """The training retriever ("dense": MiniLM) and the out-of-distribution ones ("bm25", "lsa"). The LSA
    encoder is fitted on ``fit_items`` (default: the whole catalogue), then indexes the whole catalogue."""
    lsa = LSAEncoder(list(task.items if fit_items is None else fit_items))
    return {
        "dense": DenseRetrievalReward(task.items, task.pools, task.gains, device=device),
        "bm25": BM25Reward(task.items, task.pools, task.gains),
        "lsa": DenseRetrievalReward(task.items, task.pools, task.gains, encoder=lsa, cache_dir=False),
    }


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence, max_new_tokens: int = defaults.MAX_NEW_TOKENS,
                     batch_size: int = 32, bf16: bool = False) -> list[str]:
    """Greedy completions of ``prompts`` (decoded, special tokens removed)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for s in range(0, len(prompts), batch_size):
        texts = [prompt_text(tokenizer, p) for p in prompts[s : s + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with autocast:
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def pool_scores(reward, texts: list[str], owners: torch.Tensor) -> torch.Tensor:
    """Each retriever's scores of its owners' pools: dense rewards embed, BM25 scores the text."""
    if isinstance(reward, DenseRetrievalReward):
        return reward.pool_scores(reward.encoder.encode(texts).to(reward.device), owners.to(reward.device)).cpu()
    return reward.pool_scores(texts, owners)


def query_metrics(queries: list[str], owners: Sequence[int], scorers: dict, ks=KS) -> dict:
    """Per-query NDCG, recall and MRR at each k for every retriever: ``{retriever: {"ndcg@10": [N], ...}}``."""
    own = torch.as_tensor(list(owners), dtype=torch.long)
    out = {}
    for name, reward in scorers.items():
        scores = pool_scores(reward, queries, own)
        gains = reward.pool_gains.cpu()[own]
        valid = reward.pool_valid.cpu()[own]
        out[name] = {k: v.double() for k, v in ranking_metrics(scores.float(), gains, ks=ks, valid=valid).items()}
    return out


def evaluate_queries(queries: list[str], owners: Sequence[int], scorers: dict, ks=KS) -> dict:
    """Mean NDCG, recall and MRR at each k for every retriever: ``{retriever: {"ndcg@10": ..., ...}}``."""
    return {name: {k: float(v.mean()) for k, v in table.items()}
            for name, table in query_metrics(queries, owners, scorers, ks).items()}


def repeats_itself(answer: str, segmenter: Segmenter | None = None) -> bool:
    """True when an answer repeats a phrase (the same segment twice) or a word (three times or more): the
    degenerate repetition RL on a small model can fall into."""
    words = re.findall(r"\w+", answer.lower())
    if words and max(words.count(w) for w in set(words)) >= 3:
        return True
    phrases = [" ".join(re.findall(r"\w+", p.lower())) for p in (segmenter or Segmenter())(answer).segments]
    return len(set(phrases)) < len(phrases)


def format_metrics(completions: list[str]) -> dict[str, float]:
    """The share of completions in the answer format: what the trainer logs of each step's samples
    (``OSPOTrainer(answer_metrics=format_metrics)``, ``format_rate`` in metrics.jsonl)."""
    return {"format_rate": sum(map(follows_format, completions)) / len(completions)}


def answer_stats(completions: list[str], answers: list[str], tokenizer=None) -> dict:
    """Format rate, completion tokens, segments per answer and repetition rate of a policy's answers."""
    segmenter = Segmenter()
    stats = dict(
        format_rate=statistics.fmean(map(follows_format, completions)),
        segments_per_answer=statistics.fmean(segmenter(a).num_players for a in answers),
        repetition_rate=statistics.fmean(repeats_itself(a, segmenter) for a in answers),
    )
    if tokenizer is not None:
        lengths = [len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
        stats["completion_tokens"] = statistics.fmean(lengths)
    return stats


def score_answers(samples, completions: list[str], answers: list[str], scorers: dict, ks, tokenizer=None) -> dict:
    """The result of a policy's ``completions`` (and the ``answers`` extracted from them) to ``samples``: see
    :func:`evaluate_policy`."""
    per_query = query_metrics(answers, [s.owner for s in samples], scorers, ks)
    return dict(
        table={name: {k: float(v.mean()) for k, v in table.items()} for name, table in per_query.items()},
        ndcg10={name: table["ndcg@10"].tolist() for name, table in per_query.items() if "ndcg@10" in table},
        format=answer_stats(completions, answers, tokenizer),
        answers=answers,
        examples=[dict(request=request_of(s), completion=c) for s, c in zip(samples, completions)][:5],
    )


def evaluate_policy(model, tokenizer, task, scorers: dict, max_new_tokens: int = defaults.MAX_NEW_TOKENS, ks=KS,
                    limit: int | None = None, bf16: bool = False) -> dict:
    """A policy's greedy answers to ``task``'s prompts, scored: ``table`` (mean metrics per retriever),
    ``ndcg10`` (per prompt), ``format`` (:func:`answer_stats`), ``answers`` and a few ``examples``."""
    samples = task.samples[:limit] if limit else task.samples
    completions = generate_answers(model, tokenizer, [s.prompt for s in samples], max_new_tokens, bf16=bf16)
    return score_answers(samples, completions, [extract_answer(c) for c in completions], scorers, ks, tokenizer)


def evaluate_copy_request(task, scorers: dict, ks=KS, limit: int | None = None) -> dict:
    """The ``copy request`` baseline: each request verbatim as the search query (what a policy must beat
    to be worth running)."""
    samples = task.samples[:limit] if limit else task.samples
    requests = [request_of(s) for s in samples]
    return score_answers(samples, requests, requests, scorers, ks)


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = 10000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired prompts with a 95% bootstrap interval, and the wins/ties/losses of a."""
    return bootstrap_interval(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), resamples, seed)


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
# One run: baselines, training, evaluation, report
