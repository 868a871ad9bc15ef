"""Coalition packing and sequence pooling (the packed encoder path of ``ospo_fast.evaluate``).

pack_coalitions  ``[CLS] kept tokens [SEP]`` of every coalition's sequence in one flat batch: 64 texts of up
                 to 160 tokens over 16 players (players' tokens need one bit, the gaps between two
                 players need both), 2048 sequences with random coalitions, truncated at 128 tokens.
                 Rows: ``reference`` (``pack_coalitions_reference``), ``triton``.
pool_sequences   L2-normalised mean pooling of packed hidden states: 256 sequences of 4-64 tokens (sorted
                 by length, as the packed layout orders them), width 384 (MiniLM), float32.
                 Rows: ``reference`` (method="runs", the CPU default: a view per run of equal lengths),
                 ``segments`` (index_add_ by sequence id, the GPU fallback), ``triton``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (the project's `bench` extra)")

from ospo_fast.evaluate import PackedSequences, pack_coalitions, pack_coalitions_reference, pool_packed  # noqa: E402

DEVICES = ["cpu", "cuda"]


# ----------------------------------------------------------------------------------------------------
# pack_coalitions

NUM_TEXTS, MAX_TEXT_TOKENS, NUM_PLAYERS, NUM_SEQUENCES, MAX_SEQ_LEN = 64, 160, 16, 2048, 128


@functools.cache
def _packing_inputs():
    """The keyword arguments of ``pack_coalitions_reference`` and the longest text, on the CPU."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, MAX_TEXT_TOKENS + 1, size=NUM_TEXTS)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    token_ids = rng.integers(1000, 30000, size=int(offsets[-1]))
    needs = []
    for n in lengths:  # players in order; a gap token after player p needs p and p + 1; a few never kept
        player = np.sort(rng.integers(0, NUM_PLAYERS, size=n))
        kind = rng.choice(3, size=n, p=[0.05, 0.75, 0.2])
        kind[player == NUM_PLAYERS - 1] = np.minimum(kind[player == NUM_PLAYERS - 1], 1)
        bit = np.int64(1) << player
        needs.append(np.where(kind == 0, 0, np.where(kind == 2, bit | (bit << 1), bit)))
    token_need = np.concatenate(needs).astype(np.int64)
    seq_text = rng.integers(0, NUM_TEXTS, size=NUM_SEQUENCES)
    seq_text[::97] = -1  # a few sequences with no text (the empty coalition)
    seq_keep = (rng.random((NUM_SEQUENCES, NUM_PLAYERS)) < 0.6) @ (np.int64(1) << np.arange(NUM_PLAYERS))
    kept = np.zeros(NUM_SEQUENCES, dtype=np.int64)
    for s in range(NUM_SEQUENCES):
        u = seq_text[s]
        if u >= 0:
            need = token_need[offsets[u] : offsets[u + 1]]
            kept[s] = np.count_nonzero((need != 0) & ((seq_keep[s] & need) == need))
    cu = np.concatenate([[0], np.cumsum(2 + np.minimum(kept, MAX_SEQ_LEN - 2))])
    args = dict(
        token_ids=torch.from_numpy(token_ids), token_need=torch.from_numpy(token_need),
        text_offsets=torch.from_numpy(offsets), seq_text=torch.from_numpy(seq_text),
        seq_keep=torch.from_numpy(seq_keep.astype(np.int64)), cu_seqlens=torch.from_numpy(cu),
        cls_id=101, sep_id=102, total_tokens=int(cu[-1]),
    )
    return args, int(lengths.max())


PACK_ROWS = [(d, i) for d in DEVICES for i in ("reference", "triton")]


@pytest.mark.parametrize("device,impl", PACK_ROWS, ids=[f"{d}-{i}" for d, i in PACK_ROWS])
def test_pack_coalitions(timed, require, device, impl):
    require(device, impl)
    cpu_args, longest = _packing_inputs()
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cpu_args.items()}
    backend = "torch" if impl == "reference" else impl
    expected = pack_coalitions_reference(**cpu_args)
    got = pack_coalitions(**args, max_text_tokens=longest, backend=backend)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    timed(
        lambda: pack_coalitions(**args, max_text_tokens=longest, backend=backend),
        group=f"pack_coalitions[{device}] {NUM_SEQUENCES} seqs, {args['total_tokens']} tokens",
        impl=impl, device=device,
    )


# ----------------------------------------------------------------------------------------------------
# pool_sequences

NUM_POOLED, HIDDEN = 256, 384


@functools.cache
def _pooling_inputs():
    g = torch.Generator().manual_seed(0)
    lengths = np.sort(torch.randint(4, 65, (NUM_POOLED,), generator=g).numpy())
    cu = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
    hidden = torch.randn(int(cu[-1]), HIDDEN, generator=g)
    return lengths, cu, positions, hidden


def _packed(lengths, cu, positions, device: str) -> PackedSequences:
    return PackedSequences(
        input_ids=torch.zeros(int(cu[-1]), dtype=torch.long, device=device),
        position_ids=torch.from_numpy(positions).to(device),
        cu_seqlens=torch.from_numpy(cu).to(device, torch.int32),
        lengths=lengths,
    )


POOL_ROWS = [(d, i) for d in DEVICES for i in ("reference", "segments", "triton")]


@pytest.mark.parametrize("device,impl", POOL_ROWS, ids=[f"{d}-{i}" for d, i in POOL_ROWS])
def test_pool_sequences(timed, require, device, impl):
    require(device, impl)
    lengths, cu, positions, hidden = _pooling_inputs()
    packed = _packed(lengths, cu, positions, device)
    hidden = hidden.to(device)
    method = "runs" if impl == "reference" else impl
    out = torch.empty(len(lengths), HIDDEN, dtype=torch.float32, device=device)
    expected = pool_packed(hidden.cpu(), _packed(lengths, cu, positions, "cpu"), "mean", method="runs")
    got = pool_packed(hidden, packed, "mean", method=method, out=out)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-6)
    timed(
        lambda: pool_packed(hidden, packed, "mean", method=method, out=out),
        group=f"pool_sequences[{device}] mean, {len(lengths)} seqs, {int(cu[-1])}x{HIDDEN} f32",
        impl=impl, device=device,
    )

