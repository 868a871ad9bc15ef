"""Inputs shared by the evaluation and attribution tests: random responses and hand-cut segmentations, the
dense reward over the test pool, a coalition batch, and a text reward that counts its calls."""

from __future__ import annotations

import random

import torch
from conftest import iphone_charger_pool

import ospo_fast as of
from ospo_fast.evaluate import CoalitionBatch

WORDS = (
    "iphone charger fast usb c cable for car wireless pad apple certified braided cord black white 6 ft "
    "with and or magsafe adapter 20w power delivery lightning portable compact travel wall plug pro max"
).split()


def random_response(rng: random.Random) -> str:
    """A random answer: 1-3 sentences of random shopping words, sometimes after a think block."""
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 3))]
    answer = ". ".join(sentences)
    return (f"<think>{rng.choice(WORDS)} {rng.choice(WORDS)}</think><answer>{answer}</answer>" if rng.random() < 0.5
            else answer)


def punctuated_response(rng: random.Random) -> str:
    """A random answer with punctuation, symbols and spacing between its phrases."""
    seps = [", ", ". ", "; ", " & ", " + ", " (", ") ", " / ", " - ", ": ", "! ", " ", "  ", "\n", ",", " , "]
    out = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    for _ in range(rng.randint(0, 7)):
        out += rng.choice(seps) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    return out + rng.choice(["", ".", "!", " :)"])


def words_between_players(rng: random.Random) -> of.Segmentation:
    """A segmentation cut by hand, with function words ("for", "and", "with or") and punctuation left between
    its players, as a segmenter that keeps only content words could cut it."""
    fillers = [" for ", " and ", ", with or ", " - for the ", ". and ", " of ", "; ", " (for) "]
    text, spans = "<answer>", []
    for i in range(rng.randint(1, 7)):
        if i:
            text += rng.choice(fillers)
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase
    sizes, left = [], len(spans)
    while left:
        sizes.append(rng.randint(1, left))
        left -= sizes[-1]
    return of.Segmentation(text + ".</answer>", tuple(spans), of.CoalitionStructure.from_sizes(sizes))


def dense_reward(device="cpu"):
    texts, labels = iphone_charger_pool()
    return of.rewards.DenseRetrievalReward(
        items=[t[:300] for t in texts[:60]],
        pools=[list(range(0, 60)), list(range(10, 47))],
        gains=[[of.data.esci_gain(x) for x in labels[:60]], [of.data.esci_gain(x) for x in labels[10:47]]],
        cache_dir=False,
        device=device,
    )


def coalition_batch(texts, owners, method="auto", budget=40):
    seg = of.Segmenter(max_players=6)
    sgs = [seg(t) for t in texts]
    plans = [of.make_plan(sg.structure, method, budget=budget, seed=1) for sg in sgs]
    return CoalitionBatch.build(sgs, plans, owners)


class CountingReward:
    """A text reward that counts its calls and the texts it scored."""

    def __init__(self):
        self.calls, self.scored = 0, 0

    def __call__(self, texts, owners):
        self.calls += 1
        self.scored += len(texts)
        return torch.tensor([len(set(t.split())) + 0.1 * o for t, o in zip(texts, owners)], dtype=torch.float64)
