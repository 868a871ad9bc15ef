"""The encoder evaluator: values of every coalition of a batch for a
:class:`~ospo_fast.rewards.DenseRetrievalReward`, from one packed encoder forward. The host half tokenises
each piece of text once and lays out the distinct coalition sequences; the device half packs, embeds, pools
and scores them without a stream sync."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch

from .._device import to_device_all
from ..rewards.encoder import tokenizable
from ..segment import Segmentation
from ..structure import MAX_PLAYERS
from .encoder import PackedBertForward, check_packed_options, pool_packed
from .layout import CoalitionBatch, PackedLayout, _chunks
from .packing import PackedSequences, pack_coalitions

# Odd multipliers that fold a row of phrase ids into one 64-bit key (wrapping arithmetic).
_ROW_KEY_MULTIPLIERS = np.random.default_rng(0x05F0).integers(1, 1 << 62, size=MAX_PLAYERS, dtype=np.int64) * 2 + 1


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For int64 ``rows [N, W]``: the index of one row of each distinct value, and for every row the number
    of its distinct value. Rows are compared by a 64-bit key, checked exactly (np.unique over whole rows is
    about 10x slower); on a key collision the rows themselves are compared."""
    keys = rows @ _ROW_KEY_MULTIPLIERS[: rows.shape[1]]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not np.array_equal(rows[first][inverse], rows):
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    return first, inverse


# What the packed evaluator reads of an encoder reward's encoder, beyond its model.
_ENCODER_ATTRIBUTES = ("tokenizer", "model", "max_length", "dim")


def packed_support(reward) -> str | None:
    """Why the packed evaluator cannot run for ``reward``, or None when it can. It needs an encoder reward
    (``encoder``, ``device`` and ``score_embeddings``, as :class:`~ospo_fast.rewards.DenseRetrievalReward`
    has) over a Hugging Face BERT-family encoder with its tokenizer, pooled by mean or CLS. Reads attributes
    only (nothing is built or run); the reason starts with the part of ``reward`` it is about."""
    encoder = getattr(reward, "encoder", None)
    if encoder is None or not hasattr(reward, "device") or not callable(getattr(reward, "score_embeddings", None)):
        return ("reward: expected an encoder reward (with encoder, device and score_embeddings, as "
                f"DenseRetrievalReward), got {type(reward).__name__}")
    missing = [name for name in _ENCODER_ATTRIBUTES if not hasattr(encoder, name)]
    if missing:
        return (f"reward.encoder: expected a Hugging Face transformer encoder ({', '.join(_ENCODER_ATTRIBUTES)}), "
                f"got a {type(encoder).__name__} without {', '.join(missing)}")
    pooling = getattr(encoder, "pooling", "mean")
    if pooling not in ("mean", "cls"):
        return f"reward.encoder.pooling: the packed path supports 'mean' and 'cls', got {pooling!r}"
    reason = PackedBertForward.unsupported(encoder.model)
    return None if reason is None else f"reward.encoder.model: {reason}"


# Phrases whose tokens an evaluator keeps; past this, the cache starts over (memory stays bounded).
_PHRASE_CACHE_SIZE = 1 << 17


class EncoderCoalitionEvaluator:
    """Values of every coalition of a batch for a :class:`~ospo_fast.rewards.DenseRetrievalReward`, with one
    packed encoder forward.

    ``chunk_tokens`` bounds the packed tokens of one forward (memory); larger batches are split into
    several forwards of that size. ``pack_backend``: see :func:`pack_coalitions`. ``dtype``: the encoder's
    matmul precision; None is float32 on the CPU (the per-coalition loop's numbers to fp32 tolerance) and
    bfloat16 on CUDA; ``torch.bfloat16`` on a CPU with AMX is several times faster, to bf16 tolerance.
    ``attention`` and ``dtype`` are checked here (see :func:`check_packed_options`; a dtype may be named), and
    so is ``reward`` (:func:`packed_support`).
    Threads may share an evaluator: the phrase cache (with the tokenizer) and the forward each run under a
    lock, and the rest of a call is its own.
    """

    def __init__(
        self,
        reward,
        attention: str = "auto",
        chunk_tokens: int = 1 << 16,
        pack_backend: str = "auto",
        dtype: torch.dtype | None = None,
    ):
        reason = packed_support(reward)
        if reason is not None:
            raise ValueError(reason)
        self.reward = reward
        self.encoder = reward.encoder
        tok = self.encoder.tokenizer
        attention, dtype = check_packed_options(attention, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if reward.device.type == "cuda" else torch.float32
        self.forward = PackedBertForward(self.encoder.model, attention=attention, dtype=dtype)
        self.cls_id, self.sep_id = tok.cls_token_id, tok.sep_token_id
        self.max_length = self.encoder.max_length
        self.chunk_tokens = chunk_tokens
        self.pack_backend = pack_backend
        self._phrase_tokens: dict[str, list[int]] = {}  # phrase or gap -> its token ids (see _player_tokens)
        self._phrase_lock = threading.Lock()  # the cache and the tokenizer are shared by concurrent calls

    def __call__(self, coalitions: CoalitionBatch) -> tuple[torch.Tensor, int]:
        """Values float32 ``[coalitions.batch.num_values]`` on the reward's device, and the number of
        sequences embedded."""
        layout = self.layout(coalitions)
        return self.values(layout), layout.num_sequences

    def embed(self, coalitions: CoalitionBatch) -> tuple[torch.Tensor, np.ndarray]:
        """Embeddings float32 ``[S, D]`` of the distinct coalition sequences, and for every value of
        ``coalitions.batch`` the row of its sequence (int64 ``[num_values]``)."""
        layout = self.layout(coalitions)
        return self.embed_layout(layout), layout.value_sequence

    def values(self, layout: "PackedLayout") -> torch.Tensor:
        """The device half: pack, embed, score. Values float32 ``[num_values]``; never synchronises a GPU
        stream (the host arrays go over in one non-blocking copy)."""
        embeddings, (sequence, owners) = self._embed(layout, layout.value_sequence, layout.value_owners)
        return self.reward.score_embeddings(embeddings[sequence], owners)

    def layout(self, coalitions: CoalitionBatch) -> "PackedLayout":
        """The host half: tokenise the players of the distinct texts and the text between them (each piece
        of text once, see :meth:`_player_tokens`) and lay out the sequences to embed."""
        seg_u, plans_u = coalitions.segmentations, coalitions.plans
        U = len(seg_u)
        tokens = self._player_tokens(seg_u)
        text_lengths = tokens.player_tokens.sum(axis=1) + tokens.gap_tokens.sum(axis=1)
        text_offsets = np.concatenate([[0], np.cumsum(text_lengths)]).astype(np.int64)
        width = tokens.player_tokens.shape[1]

        # Every coalition of every distinct text, flat: its kept tokens, and its content (what its coalition
        # text is made of, in order), from its bit mask. A gap enters with the player before it when the
        # player after it is kept too; a gap without tokens (whitespace) is the space of a removed run.
        sizes = np.asarray([p.num_coalitions for p in plans_u], dtype=np.int64)
        keys = np.concatenate([p.coalition_keys() for p in plans_u]) if U else np.zeros(0, dtype=np.int64)
        coalition_text = np.repeat(np.arange(U), sizes)
        kept = np.zeros(len(keys), dtype=np.int64)
        # One column per kept player, in order: (1 + its phrase id) << 32 | (1 + the id of the gap after it,
        # or 0). Piece ids count the pieces of one batch (< 2**31), so the pair is exact.
        content = np.zeros((len(keys), width), dtype=np.int64)  # 0 past the last kept player
        rank = np.zeros(len(keys), dtype=np.int64)
        for player in range(width):
            rows = np.flatnonzero((keys >> player) & 1)
            text = coalition_text[rows]
            kept[rows] += tokens.player_tokens[text, player]
            gap = np.zeros(len(rows), dtype=np.int64)
            if player + 1 < width:  # the last player has no gap after it (and no bit 64 to test)
                with_next = ((keys[rows] >> (player + 1)) & 1) == 1
                kept[rows] += np.where(with_next, tokens.gap_tokens[text, player], 0)
                gap = np.where(with_next, 1 + tokens.gap_pieces[text, player], 0)
            content[rows, rank[rows]] = ((1 + tokens.player_pieces[text, player]) << 32) | gap
            rank[rows] += 1

        # Sequence 0 is the empty coalition, shared by every response; then one sequence per distinct
        # content: coalitions of different responses with the same coalition text embed identically.
        nonempty = np.flatnonzero(keys)
        sequence_of = np.zeros(len(keys), dtype=np.int64)
        representative = nonempty
        if len(nonempty):
            first, inverse = _distinct_rows(content[nonempty])
            representative = nonempty[first]
            sequence_of[nonempty] = 1 + inverse
        lengths = np.concatenate([[2], 2 + np.minimum(kept[representative], self.max_length - 2)])
        # Sequences sorted by length, so equal lengths form runs (see PackedBertForward).
        order = np.argsort(lengths, kind="stable")
        position_of = np.empty_like(order)
        position_of[order] = np.arange(len(order))
        unique_rows, coalition = coalitions.value_rows()
        first_coalition = np.concatenate([[0], np.cumsum(sizes)])
        return PackedLayout(
            token_ids=tokens.token_ids,
            token_need=tokens.token_need,
            text_offsets=text_offsets,
            max_text_tokens=int(text_lengths.max(initial=0)),
            lengths=lengths[order],
            seq_text=np.concatenate([[-1], coalition_text[representative]])[order],
            seq_keep=np.concatenate([[0], keys[representative]])[order],
            value_sequence=position_of[sequence_of[first_coalition[unique_rows] + coalition]],
            value_owners=coalitions.value_owners(),
        )

    def _player_tokens(self, segmentations: Sequence[Segmentation]) -> "_TextTokens":
        """The tokens of every player of every text and of the text between consecutive players (its *gaps*),
        in text order: player 0, gap 0, player 1, ..., the last player (see :class:`_TextTokens`).

        Each piece is tokenised on its own: players start and end where a BERT pre-tokenizer splits anyway
        (whitespace, punctuation), so a piece's tokens are the ones it has in the response and in every
        coalition text that holds it (a gap sits between the same characters there as in the response).
        Whitespace gaps give no token. Text before the first player and after the last (a think block, the
        tags) never enters a coalition and is not tokenised at all. Pieces recur across the responses of a
        batch and across batches, so their tokens are kept (up to ``_PHRASE_CACHE_SIZE`` pieces): one
        tokenizer call covers the new ones."""
        pieces = []  # per text: player 0, gap 0, player 1, ..., the last player (2n - 1 pieces)
        for sg in segmentations:
            for i, (start, end) in enumerate(sg.spans):
                if i:
                    pieces.append(sg.text[sg.spans[i - 1][1] : start])
                pieces.append(sg.text[start:end])
        cache = self._phrase_tokens
        with self._phrase_lock:  # another call could clear the cache between our update and our reads
            new = list(dict.fromkeys(p for p in pieces if p not in cache))
            if new and len(cache) + len(new) > _PHRASE_CACHE_SIZE:
                cache.clear()  # start over with this batch's pieces
                new = list(dict.fromkeys(pieces))
            if new:
                ids = self.encoder.tokenizer(tokenizable(new), add_special_tokens=False, truncation=False)["input_ids"]
                cache.update(zip(new, ids))
            piece_ids = [cache[p] for p in pieces]
        counts = np.fromiter(map(len, piece_ids), dtype=np.int64, count=len(pieces))
        token_ids = np.fromiter(chain.from_iterable(piece_ids), dtype=np.int64, count=int(counts.sum()))
        U = len(segmentations)
        players_per_text = np.fromiter((sg.num_players for sg in segmentations), dtype=np.int64, count=U)
        pieces_per_text = np.maximum(2 * players_per_text - 1, 0)
        text_of_piece = np.repeat(np.arange(U), pieces_per_text)
        k = np.arange(len(pieces)) - np.repeat(np.cumsum(pieces_per_text) - pieces_per_text, pieces_per_text)
        player, is_gap = k >> 1, (k & 1) == 1  # piece k is player k // 2, or the gap after it when k is odd
        # Player i's tokens need bit i; the gap after it needs bits i and i + 1 (i + 1 <= 63: a player follows).
        need = np.int64(1) << player
        need[is_gap] |= np.int64(1) << (player[is_gap] + 1)
        numbering: dict[str, int] = {}
        ids = np.fromiter((numbering.setdefault(p, len(numbering)) for p in pieces), np.int64, len(pieces))
        ids[is_gap & (counts == 0)] = -1  # a gap without tokens adds nothing to a coalition's tokens
        width = int(players_per_text.max(initial=0))

        def table(values: np.ndarray, which: np.ndarray, fill: int) -> np.ndarray:
            out = np.full((U, width), fill, dtype=np.int64)
            out[text_of_piece[which], player[which]] = values[which]
            return out

        return _TextTokens(
            token_ids=token_ids,
            token_need=np.repeat(need, counts),
            player_tokens=table(counts, ~is_gap, 0),
            gap_tokens=table(counts, is_gap, 0),
            player_pieces=table(ids, ~is_gap, -1),
            gap_pieces=table(ids, is_gap, -1),
        )

    def embed_layout(self, layout: "PackedLayout") -> torch.Tensor:
        """Embeddings float32 ``[S, D]`` of the layout's sequences: packed on the device, one forward per
        chunk of at most ``chunk_tokens`` tokens."""
        return self._embed(layout)[0]

    def _embed(self, layout: "PackedLayout", *extra: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`embed_layout`, and the host arrays ``extra`` on the device: every host array of the call
        goes over in one transfer (see :func:`to_device_all`)."""
        device = self.reward.device
        lengths = layout.lengths
        chunks = _chunks(lengths, self.chunk_tokens)
        host = [layout.token_ids, layout.token_need, layout.text_offsets, layout.seq_text, layout.seq_keep, *extra]
        for lo, hi in chunks:
            cu = np.zeros(hi - lo + 1, dtype=np.int64)
            np.cumsum(lengths[lo:hi], out=cu[1:])
            positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths[lo:hi])
            host += [cu, cu.astype(np.int32), positions]
        token_ids, token_need, text_offsets, seq_text, seq_keep, *rest = to_device_all(host, device)
        extra_on_device, per_chunk = rest[: len(extra)], rest[len(extra) :]
        embeddings = torch.empty(len(lengths), self.encoder.dim, dtype=torch.float32, device=device)
        for c, (lo, hi) in enumerate(chunks):
            cu, cu32, positions = per_chunk[3 * c : 3 * c + 3]
            input_ids = pack_coalitions(
                token_ids, token_need, text_offsets, seq_text[lo:hi], seq_keep[lo:hi], cu,
                cls_id=self.cls_id, sep_id=self.sep_id, total_tokens=positions.shape[0],
                max_text_tokens=layout.max_text_tokens, backend=self.pack_backend,
            )
            packed = PackedSequences(input_ids=input_ids, position_ids=positions, cu_seqlens=cu32,
                                     lengths=lengths[lo:hi])
            hidden = self.forward.hidden_states(packed)
            pool_packed(hidden, packed, self.encoder.pooling, out=embeddings[lo:hi])
        return embeddings, extra_on_device


@dataclass
class _TextTokens:
    """The pieces of the distinct texts tokenised (:meth:`EncoderCoalitionEvaluator._player_tokens`): per text,
    player 0, gap 0 (the text between players 0 and 1), player 1, ..., the last player. The tables are
    int64 ``[U, most players]``, column i for player i and for the gap after it; a piece id numbers the
    distinct piece texts of the batch (equal texts, equal ids)."""

    token_ids: np.ndarray  # int64 [N]: the pieces' tokens, concatenated in order
    token_need: np.ndarray  # int64 [N]: the players each token needs kept (see pack_coalitions_reference)
    player_tokens: np.ndarray  # token count of player i (0 past a text's last player)
    gap_tokens: np.ndarray  # token count of the gap after player i (0 after the last player)
    player_pieces: np.ndarray  # piece id of player i (-1 past the last player)
    gap_pieces: np.ndarray  # piece id of the gap after player i (-1 when it has no token or there is none)
