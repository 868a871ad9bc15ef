"""Triton kernel that packs the kept tokens of every coalition into one variable-length batch.

One program per output sequence: it walks its text's tokens in blocks, keeps those whose players are all
in the sequence's coalition (each token's ``need`` and the coalition are int64 bit masks: a player's
tokens need its bit, the tokens between two players need both bits), ranks them with a prefix sum, and
writes ``[CLS] kept [SEP]`` at ``cu_seqlens[s]`` — truncated to the sequence's length, which the host
computed beforehand.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _pack_coalitions_kernel(
    token_ids,
    token_need,
    text_offsets,
    seq_text,
    seq_keep,
    cu_seqlens,
    out,
    cls_id,
    sep_id,
    max_text_tokens,
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    start = tl.load(cu_seqlens + s)
    end = tl.load(cu_seqlens + s + 1)
    tl.store(out + start, cls_id)
    tl.store(out + end - 1, sep_id)
    u = tl.load(seq_text + s)
    keep = tl.load(seq_keep + s)
    has_text = u >= 0
    lo = tl.load(text_offsets + u, mask=has_text, other=0)
    hi = tl.load(text_offsets + u + 1, mask=has_text, other=0)
    room = end - start - 2  # kept tokens beyond this were truncated
    written = tl.zeros((), dtype=tl.int64)  # int64 from the start: a loop-carried value keeps its type
    for block in range(0, max_text_tokens, BLOCK):
        t = lo + block + tl.arange(0, BLOCK)
        live = t < hi
        need = tl.load(token_need + t, mask=live, other=0)  # int64: bit 63 (the sign bit) is a player too
        kept = live & (need != 0) & ((keep & need) == need)
        rank = written + tl.cumsum(kept.to(tl.int64), axis=0) - 1
        ids = tl.load(token_ids + t, mask=kept, other=0)
        tl.store(out + start + 1 + rank, ids, mask=kept & (rank < room))
        written += tl.sum(kept.to(tl.int64), axis=0)


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
    block: int = 128,
) -> torch.Tensor:
    """Triton launch; arguments as ``ospo_fast.evaluate.pack_coalitions_reference``.

    ``total_tokens`` (the packed size) and ``max_text_tokens`` (the longest text) are host-side numbers,
    so the launch needs no device sync.
    """
    out = torch.empty(total_tokens, dtype=torch.int64, device=token_ids.device)
    num_sequences = seq_text.numel()
    if num_sequences:
        _pack_coalitions_kernel[(num_sequences,)](
            token_ids, token_need, text_offsets, seq_text, seq_keep, cu_seqlens, out,
            cls_id, sep_id, max_text_tokens, BLOCK=block,
        )
    return out
