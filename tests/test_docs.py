"""The code in docs/ runs as written: the loop of docs/integrations.md's "Any other trainer" section."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOCS = Path(__file__).parents[1] / "docs"


def section_code(path: Path, heading: str) -> str:
    """The python code blocks of the section ``## heading`` of ``path``, joined in order."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", path.read_text(), re.M | re.S)
    assert match, f"{path.name} has no section '## {heading}'"
    blocks = re.findall(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)
    assert blocks, f"{path.name}'s section '## {heading}' has no python code block"
    return "\n".join(blocks)


def test_the_any_trainer_loop_runs_and_trains_on_per_token_advantages(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code = section_code(DOCS / "integrations.md", "Any other trainer (OpenRLHF, your own loop)")
    ns: dict = {}
    exec(compile(code, "docs/integrations.md#any-other-trainer", "exec"), ns)

    B, T = ns["completion_ids"].shape
    assert B == 8 and ns["token_adv"].shape == (B, T) and torch.isfinite(ns["loss"])
    # What the section promises: tokens outside the segments get exactly the trainer's advantage, and each
    # completion's segment tokens share it out with the same mean.
    credit, adv, mask, rows = ns["credit"], ns["advantages"], ns["mask"], ns["token_adv"]
    outside = ~credit.segment_mask & mask
    assert torch.equal(rows[outside], adv[:, None].expand_as(rows)[outside])
    for j in range(B):
        segment = credit.segment_mask[j] & mask[j]
        if segment.any():
            torch.testing.assert_close(rows[j][segment].mean(), adv[j], rtol=1e-5, atol=1e-6)
