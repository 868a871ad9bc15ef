"""Text rewards: every distinct (owner, coalition text) pair of a batch scored in one call of
``reward(texts, owners)``, with the reward's output checked."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..segment import coalition_texts
from .layout import CoalitionBatch


def evaluate_text_reward(reward: Callable, coalitions: CoalitionBatch) -> tuple[torch.Tensor, int]:
    """Values float64 ``[coalitions.batch.num_values]`` from one call of ``reward(texts, owners)``.

    Returns the values and the number of distinct (owner, text) pairs the reward scored.
    """
    texts_u = [coalition_texts(sg, plan.masks) for sg, plan in zip(coalitions.segmentations, coalitions.plans)]
    unique_rows, coalition = coalitions.value_rows()
    owners = coalitions.value_owners()
    index_of: dict[tuple[int, str], int] = {}
    query_texts, query_owners = [], []
    value_index = np.empty(len(owners), dtype=np.int64)
    for k, (u, c, o) in enumerate(zip(unique_rows.tolist(), coalition.tolist(), owners.tolist())):
        key = (o, texts_u[u][c])
        j = index_of.get(key)
        if j is None:
            j = index_of[key] = len(query_texts)
            query_texts.append(key[1])
            query_owners.append(o)
        value_index[k] = j
    if not query_texts:
        return torch.zeros(0, dtype=torch.float64), 0
    scores = _reward_values(reward, reward(query_texts, query_owners), len(query_texts))
    return scores[torch.from_numpy(value_index)], len(query_texts)


def _reward_values(reward: Callable, out, n: int) -> torch.Tensor:
    """A text reward's output for ``n`` texts as float64 ``[n]`` on the CPU; a ValueError naming the reward
    and what was expected when it is not ``n`` finite real numbers (a tensor, an array or a list)."""
    name = getattr(reward, "__name__", None) or type(reward).__name__
    expected = f"expected {n} finite real numbers (a float tensor, array or list of shape [{n}]), one per text"
    if isinstance(out, (str, bytes)):
        raise ValueError(f"reward {name}: returned a {type(out).__name__}; {expected}")
    try:
        values = torch.as_tensor(out)
    except (TypeError, ValueError, RuntimeError) as exc:  # None, strings, ragged lists
        raise ValueError(f"reward {name}: returned {_preview(out)}, not numbers ({exc}); {expected}") from None
    if values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"reward {name}: returned values of dtype {values.dtype}; {expected}")
    if values.dim() == 2 and values.shape[1] == 1:  # a column [n, 1], as a model head returns it
        values = values[:, 0]
    if tuple(values.shape) != (n,):
        raise ValueError(f"reward {name}: returned shape {tuple(values.shape)}; {expected}")
    values = values.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"reward {name}: returned NaN or infinite values for some coalition texts; {expected}")
    return values


def _preview(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
