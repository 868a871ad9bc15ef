"""The README's code runs as written: the Training section's snippet, from completions to the loss."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def section_code(heading: str) -> str:
    """The python code blocks of the README section ``## heading``, joined in order."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    blocks = re.findall(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)
    assert blocks, f"README.md's section '## {heading}' has no python code block"
    return "\n".join(blocks)


def test_training_snippet_runs_and_gives_the_shapes_it_promises(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the snippet writes nothing; make sure of it
    ns: dict = {}
    exec(compile(section_code("Training"), "README.md#training", "exec"), ns)

    ids, mask = ns["completion_ids"], ns["completion_mask"]
    N, T = ids.shape
    assert N == len(ns["completions"]) == len(ns["owners"]) and mask.shape == (N, T) and mask.dtype == torch.bool
    credit = ns["credit"]
    assert credit.texts == ns["completions"]  # tags are ordinary tokens: decoding gives the texts back
    assert credit.credit.shape == credit.token_player.shape == (N, T)
    assert ns["rewards"].shape == ns["adv"].shape == (N,)
    assert ns["tok_adv"].shape == (N, T)
    assert ns["logits"].shape == (N, T, len(ns["tokenizer"]))
    assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])
    assert all(p.grad is not None for p in ns["model"].parameters() if p.requires_grad)

    # What the section's text promises: each answer's reward is its game's v(N), every trained token outside
    # the segments gets exactly its completion's advantage, and the mean over the segment tokens stays it.
    answers = [t.removeprefix("<answer>").removesuffix("</answer>") for t in ns["completions"]]
    torch.testing.assert_close(ns["rewards"], ns["reward"](answers, ns["owners"]).float())
    adv, tok_adv, segments = ns["adv"], ns["tok_adv"], credit.token_player >= 0
    outside = mask & ~segments
    assert segments.any(dim=1).all() and outside.any()
    assert torch.equal(tok_adv[outside], adv[:, None].expand(N, T)[outside])
    segment_mean = (tok_adv * segments).sum(1) / segments.sum(1)
    torch.testing.assert_close(segment_mean, adv)
    assert (tok_adv[segments] != adv[:, None].expand(N, T)[segments]).any()  # the credit moved something
