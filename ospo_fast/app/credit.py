"""A controlled credit-assignment benchmark: search answers whose segments' worth is known by construction.

Each prompt gives a shopper's request and a few attribute hints for the wanted product. Some hints are
phrases of the judged product's own text ("true"), the others phrases of the pool's negative nearest to it
("decoys": the same kind of product). The prompt marks them (``[+]`` for true, ``[-]`` for decoys), so a
policy can learn to read the marks. The answer is the request followed by the hints the policy keeps,
comma-separated::

    Request: mama koala
    Hints: [+] waterproof; [-] bamboo; [+] 6 pack; [-] pink

    -> mama koala, waterproof, 6 pack

With the real MiniLM retrieval reward, keeping a true hint raises the judged product in its pool and
keeping a decoy raises its look-alike, so each segment's sign is known: a good credit assignment gives true
hints positive and decoys negative values. :func:`attribution_check` measures that, with no training, for
exact and sampled Owen values and for leave-one-out.

Hints are phrases that the segmenter keeps as one segment, that are not in the request, and that appear in
one of the two items' texts but not in the other's.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import numpy as np

from .. import defaults
from ..data.prompts import chat
from ..data.tasks import Sample, SearchTask
from ..segment import CONJUNCTIONS, PREPOSITIONS, Segmenter

__all__ = ["CREDIT_SYSTEM", "credit_task", "hint_phrases", "credit_answer", "warm_start_pairs", "attribution_check"]

CREDIT_SYSTEM = (
    "You write a product search query: the shopper's request, then the hints marked [+], comma-separated. "
    "Leave out the hints marked [-]."
)

_WORDS = re.compile(r"[a-z0-9]+")
#: Words that open a segment (conjunctions, prepositions) but carry nothing about the product.
_OPENERS = CONJUNCTIONS | PREPOSITIONS | {"the", "a", "an", "your", "our", "this", "it", "its"}


def _words(text: str) -> set[str]:
    return set(_WORDS.findall(text.lower()))


def hint_phrases(item_text: str, other_text: str, request: str, segmenter: Segmenter | None = None,
                 max_words: int = 4) -> list[str]:
    """Candidate hints from ``item_text``: its segments, lowercased and without a leading conjunction,
    preposition or article, of 1 to ``max_words`` words, that stay one segment on their own, share no word
    with ``request`` and have a word that ``other_text`` lacks, in order of appearance, without repeats."""
    segmenter = segmenter or Segmenter()
    avoid, other = _words(request), _words(other_text)
    out: list[str] = []
    for segment in segmenter(item_text).segments:
        words = _WORDS.findall(segment.lower())
        while words and words[0] in _OPENERS:  # "and flare summer" -> "flare summer"
            words = words[1:]
        phrase = " ".join(words)
        if not 1 <= len(words) <= max_words or phrase in out or len(phrase) < 3:
            continue
        if avoid & set(words) or not set(words) - other or all(w.isdigit() for w in words):
            continue
        if segmenter(phrase).num_players != 1:
            continue
        out.append(phrase)
    return out


def credit_answer(request: str, hints: Sequence[str]) -> str:
    """The answer format: the request, then the kept hints, comma-separated."""
    return ", ".join([request, *hints])


def credit_task(base: SearchTask, num_true: int = 2, num_decoys: int = 2, seed: int = 0) -> SearchTask:
    """The benchmark's task over ``base``'s catalogue and pools (e.g. :func:`~ospo_fast.data.default_task`).

    For each sample with a judged product, the request is the sample's query (ESCI), else the judged item's
    category (H&M: its product type, so the hints must say which one of that type). The decoy item is the
    negative of its pool that shares the most words with the judged product; ``num_true`` hints come from the
    judged product and ``num_decoys`` from the decoy (:func:`hint_phrases`), shuffled together with a
    generator seeded by ``seed``. Samples with too few hints of either kind are dropped. ``sample.info`` holds
    ``true_hints``, ``decoy_hints`` and ``decoy_item``; the prompt is a system message
    (:data:`CREDIT_SYSTEM`) and the request with its marked hints.
    """
    for name, value in (("num_true", num_true), ("num_decoys", num_decoys)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    rng = np.random.Generator(np.random.PCG64(seed))
    segmenter = Segmenter()
    samples = []
    for sample in base.samples:
        pool, gains = base.pools[sample.owner], base.gains[sample.owner]
        judged = [i for i, g in zip(pool, gains) if g > 0]
        if not judged:
            continue
        target = judged[int(np.argmax([g for g in gains if g > 0]))]
        # The request: the shopper's query (ESCI); else the judged item's category (H&M: its product type).
        request = sample.query or (base.categories[target] if base.categories else None)
        if not request:
            continue
        target_words = _words(base.items[target])
        negatives = [i for i, g in zip(pool, gains) if g <= 0]
        decoy = max(negatives, key=lambda i: (len(_words(base.items[i]) & target_words), -i))
        true = hint_phrases(base.items[target], base.items[decoy], request, segmenter)[:num_true]
        decoys = hint_phrases(base.items[decoy], base.items[target], request, segmenter)[:num_decoys]
        if len(true) < num_true or len(decoys) < num_decoys:
            continue
        marked = [("+", h) for h in true] + [("-", h) for h in decoys]
        marked = [marked[j] for j in rng.permutation(len(marked))]
        text = f"Request: {request}\nHints: " + "; ".join(f"[{m}] {h}" for m, h in marked)
        samples.append(replace(
            sample, prompt=chat(text, CREDIT_SYSTEM), text=text, query=request,
            info={**sample.info, "true_hints": true, "decoy_hints": decoys, "decoy_item": int(decoy)},
        ))
    if not samples:
        raise ValueError("base: no sample has enough hints of both kinds; lower num_true / num_decoys")
    return replace(base, name=f"{base.name}-credit", samples=samples)


def prompt_hints(sample: Sample) -> list[str]:
    """The hints of a credit-task prompt, in prompt order (true and decoy alike)."""
    return re.findall(r"\] ([^;\n]+)", sample.text)


def warm_start_pairs(task: SearchTask, copies: int = 8, seed: int = 0, extra: int = 0,
                     items: Sequence[str] | None = None) -> tuple[list, list[str]]:
    """(prompts, targets) that teach a small policy the answer format, not the choice: each prompt ``copies``
    times, each time with the request and a random subset of its hints (true and decoy alike, in prompt
    order), so which hints to keep is left to RL. ``extra`` more pairs use pseudo-requests and pseudo-hints
    cut from ``items`` (default: the catalogue), so that the policy learns to copy any text, not to
    memorise the training requests."""
    rng = np.random.Generator(np.random.PCG64(seed))
    prompts, targets = [], []

    def add(request: str, hints: list[str], prompt) -> None:
        keep = rng.random(len(hints)) < 0.5
        prompts.append(prompt)
        targets.append(credit_answer(request, [h for h, k in zip(hints, keep) if k]))

    for s in task.samples:
        for _ in range(copies):
            add(s.query, prompt_hints(s), s.prompt)
    words = [w for w in (_WORDS.findall(t.lower())[:24] for t in (task.items if items is None else items))
             if len(w) >= 4]
    for _ in range(extra if words else 0):
        def phrase(low: int, high: int) -> str:
            w = words[int(rng.integers(len(words)))]
            n = int(rng.integers(low, min(high, len(w)) + 1))
            start = int(rng.integers(len(w) - n + 1))
            return " ".join(w[start : start + n])

        request, hints = phrase(2, 5), [phrase(1, 3) for _ in range(4)]
        marks = rng.permutation(["+", "+", "-", "-"])
        text = f"Request: {request}\nHints: " + "; ".join(f"[{m}] {h}" for m, h in zip(marks, hints))
        add(request, hints, chat(text, CREDIT_SYSTEM))
    return prompts, targets


def _hint_of_segment(segments: Sequence[str], hints: dict[str, str]) -> list[str | None]:
    """The kind ("true" / "decoy") of each segment that is a whole hint, else None."""
    return [hints.get(" ".join(_WORDS.findall(s.lower()))) for s in segments]


def hint_mix(samples: Sequence[Sample], answers: Sequence[str]) -> dict:
    """Which hints the answers keep, a direct reading of what training did with the credit: ``{"true hints
    kept": x, "decoys kept": x}``, the share of each prompt's true hints and of its decoys that its answer
    keeps as a segment of its own, averaged over the prompts."""
    segmenter = Segmenter()

    def words(text: str) -> str:
        return " ".join(_WORDS.findall(text.lower()))

    true_kept, decoys_kept = [], []
    for s, answer in zip(samples, answers, strict=True):
        segments = {words(seg) for seg in segmenter(answer).segments}
        true_kept.append(np.mean([words(h) in segments for h in s.info["true_hints"]]))
        decoys_kept.append(np.mean([words(h) in segments for h in s.info["decoy_hints"]]))
    return {"true hints kept": float(np.mean(true_kept)), "decoys kept": float(np.mean(decoys_kept))}


def attribution_check(task: SearchTask, reward, budget: int = defaults.BUDGET, seed: int = defaults.SEED,
                      limit: int | None = None) -> dict:
    """How often each credit assignment gives hint segments the right sign, with no training.

    Each sample's answer keeps every hint (:func:`credit_answer`, in prompt order). Its segments that are
    whole hints are scored by exact Owen values, sampled Owen values (``budget`` coalitions) and leave-one-out
    (``v(N) - v(N without the segment)``), all on ``reward``. A true hint's value should be positive, a
    decoy's negative; a value of exactly 0 counts as wrong.

    Returns ``{"exact": {"right_sign": x, "true": x, "decoy": x, "zero": x}, "sampled": {...},
    "leave_one_out": {...}, "num_segments": n, "num_answers": m, "mean_value": {"true": x, "decoy": x}}``:
    the share of hint segments with the right sign (all, true hints, decoys), the share valued exactly 0,
    and the mean exact Owen value of each kind.
    """
    from ..attribution import OwenAttributor

    samples = task.samples[:limit] if limit else task.samples
    texts, kinds = [], []
    for s in samples:
        texts.append(credit_answer(s.query, prompt_hints(s)))
        kinds.append({h: "true" for h in s.info["true_hints"]} | {h: "decoy" for h in s.info["decoy_hints"]})
    owners = [s.owner for s in samples]
    exact = OwenAttributor(reward, method="exact", seed=seed)(texts, owners)
    sampled = OwenAttributor(reward, method="sampled", budget=budget, seed=seed)(texts, owners)

    methods = ("exact", "sampled", "leave_one_out")
    right: dict[str, dict[str, list[bool]]] = {m: {"true": [], "decoy": []} for m in methods}
    values: dict[str, list[float]] = {"true": [], "decoy": []}
    zeros = dict.fromkeys(methods, 0)  # segments given no credit at all (saturated NDCG: one removal moves nothing)
    for a_exact, a_sampled, hints in zip(exact, sampled, kinds):
        plan = a_exact.plan
        for i, kind in enumerate(_hint_of_segment(a_exact.segmentation.segments, hints)):
            if kind is None:
                continue
            without = plan.masks[plan.full_index].clone()
            without[i] = False  # N without segment i: a coalition of every exact plan
            row = int((plan.masks == without).all(1).nonzero()[0, 0])
            estimates = dict(exact=float(a_exact.phi[i]), sampled=float(a_sampled.phi[i]),
                             leave_one_out=float(a_exact.values[plan.full_index] - a_exact.values[row]))
            sign = 1.0 if kind == "true" else -1.0
            for method, value in estimates.items():
                right[method][kind].append(sign * value > 0)
                zeros[method] += value == 0
            values[kind].append(estimates["exact"])
    out: dict = {}
    for method in methods:
        both = right[method]["true"] + right[method]["decoy"]
        out[method] = {"right_sign": float(np.mean(both)) if both else float("nan"),
                       **{kind: float(np.mean(r)) if r else float("nan") for kind, r in right[method].items()},
                       "zero": zeros[method] / max(len(both), 1)}
    out["num_segments"] = len(values["true"]) + len(values["decoy"])
    out["num_answers"] = len(texts)
    out["mean_value"] = {kind: float(np.mean(v)) if v else float("nan") for kind, v in values.items()}
    return out
