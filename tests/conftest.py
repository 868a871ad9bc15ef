"""Shared test helpers: random games, brute-force Owen and Shapley values, the backends to compare."""

from __future__ import annotations

import csv
import itertools
import math
import os
from pathlib import Path

import torch

# Triton kernels run on the CPU in the interpreter when there is no GPU; the flag must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ospo_fast import _extension  # noqa: E402
from ospo_fast.structure import CoalitionStructure  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can run."""
    out = [("torch", "cpu")]
    if _extension.has_cpp():
        out.append(("cpp", "cpu"))
    if _extension.has_triton():
        out.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        out.append(("torch", "cuda"))
    if _extension.has_cuda_kernels():
        out.append(("cuda", "cuda"))
    return out


BACKENDS = available_backends()
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]


# ----------------------------------------------------------------------------------------------------
# Games: a table of values over all 2^n coalitions, indexed by the coalition's bit mask.


def mask_ids(masks: torch.Tensor) -> torch.Tensor:
    """int64 [C]: bit i of the id is masks[:, i]."""
    n = masks.shape[1]
    return (masks.long() << torch.arange(n)).sum(dim=1)


class TableGame:
    """v(S) = table[mask id of S]; counts its calls so tests can check ``owen_values`` calls it once."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.calls = 0

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.table[mask_ids(masks)]

    def v(self, members) -> float:
        return float(self.table[sum(1 << i for i in members)])


def random_game(n: int, generator: torch.Generator) -> TableGame:
    return TableGame(torch.randn(1 << n, dtype=torch.float64, generator=generator))


def random_structure(n: int, generator: torch.Generator) -> CoalitionStructure:
    """A random partition of 0..n-1 into unions (players shuffled, so unions need not be contiguous)."""
    players = torch.randperm(n, generator=generator).tolist()
    cuts = sorted(torch.randperm(n - 1, generator=generator)[: int(torch.randint(0, n, (1,), generator=generator))]
                  .add(1).tolist())
    bounds = [0] + cuts + [n]
    return CoalitionStructure([players[a:b] for a, b in zip(bounds, bounds[1:])])


# ----------------------------------------------------------------------------------------------------
# Brute force, straight from the formulas (no code shared with ospo_fast.plans).


def _subsets(items):
    items = list(items)
    return itertools.chain.from_iterable(itertools.combinations(items, r) for r in range(len(items) + 1))


def brute_force_owen(game: TableGame, structure: CoalitionStructure) -> list[float]:
    m = structure.num_unions
    phi = [0.0] * structure.num_players
    for k, union in enumerate(structure.unions):
        p = len(union)
        others = [j for j in range(m) if j != k]
        for i in union:
            rest = [q for q in union if q != i]
            for R in _subsets(others):
                Q = [q for j in R for q in structure.unions[j]]
                wr = math.factorial(len(R)) * math.factorial(m - len(R) - 1) / math.factorial(m)
                for T in _subsets(rest):
                    wt = math.factorial(len(T)) * math.factorial(p - len(T) - 1) / math.factorial(p)
                    S = Q + list(T)
                    phi[i] += wr * wt * (game.v(S + [i]) - game.v(S))
    return phi


def brute_force_shapley(v, n: int) -> list[float]:
    """Shapley values of the game ``v(tuple of players)`` on players 0..n-1."""
    phi = [0.0] * n
    for i in range(n):
        for S in _subsets([j for j in range(n) if j != i]):
            w = math.factorial(len(S)) * math.factorial(n - len(S) - 1) / math.factorial(n)
            phi[i] += w * (v(tuple(S) + (i,)) - v(S))
    return phi


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    """torch.testing.assert_close that also prints the few worst elements."""
    actual, expected = actual.detach().cpu().double(), torch.as_tensor(expected, dtype=torch.float64).detach().cpu()
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError:
        err = (actual - expected).abs().flatten()
        worst = err.argsort(descending=True)[:5].tolist()
        rows = ", ".join(f"[{j}] {actual.flatten()[j]:.6g} vs {expected.flatten()[j]:.6g}" for j in worst)
        raise AssertionError(f"{what} mismatch; worst elements: {rows}") from None


# ----------------------------------------------------------------------------------------------------
# Real data shipped with the tests (tests/data, each folder with a SOURCE.txt).

DATA = Path(__file__).resolve().parent / "data"


def iphone_charger_pool() -> tuple[list[str], list[str]]:
    """The ESCI query "iphone charger" with its 99 judged products: (product texts, ESCI labels)."""
    with (DATA / "esci" / "iphone_charger_pool.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["product_text"] for r in rows], [r["esci_label"] for r in rows]
