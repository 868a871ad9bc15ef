"""Coalition packing: the torch reference against the definition of a kept token, the Triton kernel against
the reference, and the runs of equal lengths of a packed batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ospo_fast import _extension
from ospo_fast.evaluate import PackedSequences, pack_coalitions, pack_coalitions_reference
from ospo_fast.structure import MAX_PLAYERS

_LOW_AND_HIGH_PLAYERS = list(range(7)) + list(range(MAX_PLAYERS - 7, MAX_PLAYERS))  # bit 63 is the sign bit


def _as_int64(values: list[int]) -> torch.Tensor:
    """Unsigned 64-bit masks (Python ints) as the int64 tensor of the same bits."""
    return torch.from_numpy(np.array(values, dtype=np.uint64).view(np.int64))


def _kept_by_definition(need: int, keep: int) -> bool:
    """A token is kept when it needs some players and all of them are kept (masks as unsigned Python ints)."""
    return need != 0 and keep & need == need


def _random_packing_inputs(seed: int):
    """Texts of players' tokens (one bit) and gap tokens (two adjacent bits), some never kept (0), from players
    near bit 0 and near bit 63; random coalitions (dense, so that gaps are often kept), some truncated."""
    rng = np.random.default_rng(seed)
    num_texts, num_sequences = 5, 23
    lengths = rng.integers(0, 41, size=num_texts)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    total = int(offsets[-1])
    token_ids = torch.from_numpy(rng.integers(1000, 30000, size=total))
    player = rng.choice(_LOW_AND_HIGH_PLAYERS, size=total)
    kind = rng.integers(0, 3, size=total)  # 0: never kept, 1: a player's token, 2: a gap's token
    kind[(player == MAX_PLAYERS - 1) & (kind == 2)] = 1  # the last player has no gap after it
    needs = [0 if k == 0 else (1 << p) | ((1 << (p + 1)) if k == 2 else 0)
             for p, k in zip(player.tolist(), kind.tolist())]
    seq_text = torch.from_numpy(rng.integers(-1, num_texts, size=num_sequences))
    keeps = [sum(1 << b for b in range(MAX_PLAYERS) if rng.random() < 0.8) for _ in range(num_sequences)]
    keeps[:3] = [(1 << 64) - 1, 1 << 63, 0]  # every bit (-1 as int64); the sign bit alone; none
    kept = []
    for s in range(num_sequences):
        u = int(seq_text[s])
        lo, hi = (int(offsets[u]), int(offsets[u + 1])) if u >= 0 else (0, 0)
        kept.append(sum(_kept_by_definition(needs[t], keeps[s]) for t in range(lo, hi)))
    room = rng.integers(0, 12, size=num_sequences)  # truncation of some sequences
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(2 + np.minimum(kept, room))]))
    return dict(token_ids=token_ids, token_need=_as_int64(needs), text_offsets=offsets, seq_text=seq_text,
                seq_keep=_as_int64(keeps), cu_seqlens=cu, cls_id=101, sep_id=102,
                total_tokens=int(cu[-1])), int(lengths.max())


@pytest.mark.skipif(not _extension.has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("seed", range(3))
def test_triton_packing_kernel_matches_reference(seed):
    args, longest = _random_packing_inputs(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    got = pack_coalitions(**dev, max_text_tokens=longest, backend="triton")
    torch.testing.assert_close(got.cpu(), pack_coalitions_reference(**args))


@pytest.mark.parametrize("seed", [7, 8])
def test_packing_reference_keeps_the_coalitions_tokens_in_order(seed):
    args, _ = _random_packing_inputs(seed)
    out = pack_coalitions_reference(**args)
    cu = args["cu_seqlens"]
    needs = [n % (1 << 64) for n in args["token_need"].tolist()]
    gaps_kept = 0
    for s in range(len(cu) - 1):
        seq = out[cu[s] : cu[s + 1]]
        assert seq[0] == 101 and seq[-1] == 102
        u, keep = int(args["seq_text"][s]), int(args["seq_keep"][s]) % (1 << 64)
        if u >= 0:
            lo, hi = int(args["text_offsets"][u]), int(args["text_offsets"][u + 1])
            kept = [t for t in range(lo, hi) if _kept_by_definition(needs[t], keep)]
            gaps_kept += sum(needs[t].bit_count() == 2 for t in kept)
            assert seq[1:-1].tolist() == args["token_ids"][kept][: len(seq) - 2].tolist()
    assert gaps_kept > 0


def test_runs_are_the_maximal_runs_of_equal_lengths():
    """PackedSequences.runs() against the plain walk, on sorted and unsorted lengths, empty and single."""
    def walk(lengths):
        runs, token, s = [], 0, 0
        while s < len(lengths):
            e = s
            while e < len(lengths) and lengths[e] == lengths[s]:
                e += 1
            runs.append((token, s, e - s, int(lengths[s])))
            token, s = token + (e - s) * int(lengths[s]), e
        return runs

    rng = np.random.default_rng(8)
    for trial in range(300):
        lengths = rng.integers(1, 5, size=int(rng.integers(0, 25)))
        if trial % 2:
            lengths = np.sort(lengths)
        packed = PackedSequences(torch.zeros(0), torch.zeros(0), torch.zeros(0), lengths)
        assert packed.runs() == walk(lengths)
        assert packed.runs() is packed.runs()  # computed once
