"""The supervised warm start: teaches a fresh policy (the tiny one) the task's answer format before RL."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..policy import prompt_text
from . import defaults as app_defaults


def supervised_warm_start(
    model, tokenizer, prompts: Sequence, targets: Sequence[str], steps: int = app_defaults.WARM_START_STEPS,
    batch_size: int = 16, learning_rate: float = app_defaults.WARM_START_LR, seed: int = 0, progress: bool = True,
    bf16: bool = False,
) -> list[float]:
    """A short supervised fine-tune on (prompt, target completion) pairs, so a fresh policy writes the
    answer format before RL starts. Only the completion tokens (and the end-of-sequence token) are trained.
    ``bf16`` runs the forward under bf16 autocast (the weights and the optimizer stay fp32). Returns the loss of
    each step."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"targets: expected one target per prompt ({len(prompts)}), got {len(targets)}")
    device = next(model.parameters()).device
    rng = np.random.Generator(np.random.PCG64(seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    examples = []
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((p, t))
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="warm start", unit="step")
    model.train()
    for _ in iterator:
        batch = [examples[i] for i in rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)]
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, t) in enumerate(batch):
            seq = p + t
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(p) : len(seq)] = torch.tensor(t)
            attention[row, : len(seq)] = 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if progress:
            iterator.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
