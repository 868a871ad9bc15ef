"""Packing the kept tokens of every coalition into one variable-length batch (``[CLS] kept tokens [SEP]`` per
sequence, no padding): the torch reference and the Triton kernel, chosen in :mod:`ospo_fast.dispatch`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import dispatch


@dataclass
class PackedSequences:
    """A variable-length batch: sequence ``s`` is ``input_ids[cu_seqlens[s]:cu_seqlens[s+1]]``.

    ``input_ids``, ``position_ids``: int64 ``[total]``; ``cu_seqlens``: int32 ``[S + 1]`` on the device;
    ``lengths``: the same lengths on the host (numpy), so no device read is needed to lay out attention.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: np.ndarray
    _runs: list | None = field(default=None, init=False, repr=False, compare=False)  # see runs()

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def runs(self) -> list[tuple[int, int, int, int]]:
        """Maximal runs of consecutive sequences of equal length: (first token, first sequence, sequences,
        length). A run's tokens are a ``[sequences, length]`` block, so per-sequence work on it needs no
        padding and no index: a view. Computed once per batch (the forward and the pooling both use it)."""
        if self._runs is None:
            lengths = np.asarray(self.lengths, dtype=np.int64)
            first = np.flatnonzero(np.diff(lengths, prepend=-1))  # where the length changes
            counts = np.diff(first, append=len(lengths))
            run_lengths = lengths[first]
            tokens = np.cumsum(counts * run_lengths) - counts * run_lengths
            self._runs = list(zip(tokens.tolist(), first.tolist(), counts.tolist(), run_lengths.tolist()))
        return self._runs


def pack_coalitions_reference(
    token_ids: torch.Tensor,
    token_need: torch.Tensor,
    text_offsets: torch.Tensor,
    seq_text: torch.Tensor,
    seq_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cls_id: int,
    sep_id: int,
    total_tokens: int,
) -> torch.Tensor:
    """Torch reference of the packing kernel (``ospo_fast/kernels/pack_coalitions.py``).

    token_ids: int64 ``[N]`` (tokens of all texts, concatenated); token_need: int64 ``[N]``, for each token
    the bit mask of the players that must all be kept for it to be kept (``1 << i`` for player i's tokens,
    ``(1 << i) | (1 << (i + 1))`` for the tokens of the text between players i and i + 1; 0 = never kept);
    text_offsets: int64 ``[U + 1]``; seq_text: int64 ``[S]`` (-1: a sequence with no text tokens);
    seq_keep: int64 ``[S]`` bit masks of the kept players (bit 63 is the sign bit); cu_seqlens: int64
    ``[S + 1]`` (each sequence holds ``[CLS] kept tokens [SEP]``, truncated to its length). A token is kept
    when ``need != 0 and keep & need == need``. Returns int64 ``[total_tokens]`` (``total_tokens ==
    cu_seqlens[-1]``, passed from the host).
    """
    device = token_ids.device
    out = torch.empty(total_tokens, dtype=torch.int64, device=device)
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    out[starts] = cls_id
    out[ends - 1] = sep_id
    # One row per (sequence, token of its text), in order.
    has_text = seq_text >= 0
    text = seq_text.clamp(min=0)
    first = torch.where(has_text, text_offsets[text], 0)
    count = torch.where(has_text, text_offsets[text + 1] - first, 0)
    seq = torch.repeat_interleave(torch.arange(seq_text.numel(), device=device), count)
    row_start = torch.cumsum(count, 0) - count
    token = first[seq] + torch.arange(seq.numel(), device=device) - row_start[seq]
    need = token_need[token]
    kept = (need != 0) & ((seq_keep[seq] & need) == need)
    # Rank of each kept token inside its sequence; those past the sequence's room were truncated.
    kept_so_far = torch.cumsum(kept.long(), 0)
    kept_before = torch.cat([kept_so_far.new_zeros(1), kept_so_far])[row_start]
    rank = kept_so_far - 1 - kept_before[seq]
    write = kept & (rank < (ends - starts - 2)[seq])
    out[starts[seq[write]] + 1 + rank[write]] = token_ids[token[write]]
    return out


def pack_coalitions(
    token_ids: torch.Tensor,
    token_need: torch.Tensor,
    text_offsets: torch.Tensor,
    seq_text: torch.Tensor,
    seq_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cls_id: int,
    sep_id: int,
    total_tokens: int,
    max_text_tokens: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Packed ``[CLS] kept tokens [SEP]`` of every sequence (see :func:`pack_coalitions_reference`).

    ``backend``: "triton" (CUDA, or the CPU under TRITON_INTERPRET=1), "torch", or "auto" (triton on CUDA
    when installed, else torch). ``total_tokens``, ``max_text_tokens``: the packed size and the longest
    text's token count, known on the host.
    """
    if dispatch.resolve("packing", backend, token_ids.device) == "torch":
        return pack_coalitions_reference(
            token_ids, token_need, text_offsets, seq_text, seq_keep, cu_seqlens, cls_id, sep_id, total_tokens
        )
    from ..kernels.pack_coalitions import pack_coalitions as triton_pack

    return triton_pack(
        token_ids, token_need, text_offsets, seq_text, seq_keep, cu_seqlens, cls_id, sep_id, total_tokens,
        max_text_tokens,
    )
