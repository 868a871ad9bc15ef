"""Owen values -> credit on tokens: the excess credit and the worth of each segment, spread over its tokens, and
the credit of attributed texts on a tokenizer's tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._checks import as_real_tensor
from .._device import to_device
from ..attribution import Attributions
from ..plans import CoalitionPlan
from .token_maps import token_player_maps

# ----------------------------------------------------------------------------------------------------
# Owen values -> token credit


def excess_credit(plan: CoalitionPlan, values: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Each player's credit beyond its structural share of the whole response's value: its Owen value in the
    game with v(N) and v(empty) set to 0.

    ``phi_i = w_i v(N) + e_i v(empty) + (terms of the other coalitions)`` (:meth:`CoalitionPlan.boundary_weights`);
    this returns ``phi_i - w_i v(N) - e_i v(empty)``. It sums to 0 over the players and does not depend on
    v(N) or v(empty): when the other coalitions' values carry no information about the reward (the rewards are
    noise), it is independent of the response's reward, and so of its advantage. The Owen value itself is
    not: a share ``w_i`` of ``v(N) - v(empty)`` comes with every player, larger for the players of small
    unions. As the credit of a redistribution it keeps every token class neutral under rewards that carry no
    signal (docs/credit.md).

    Args:
        plan: the response's plan; values: float ``[C]`` (or ``[..., C]``), its coalitions' values;
        phi: float ``[n]`` (or ``[..., n]``), their Owen values (:func:`~ospo_fast.owen_from_values`).
    Returns:
        float, ``phi``'s shape, dtype and device.
    """
    if plan.num_players == 0:
        return phi
    full, empty = (w.to(device=phi.device, dtype=phi.dtype) for w in plan.boundary_weights())
    v_full = values[..., plan.full_index, None].to(phi.dtype)
    v_empty = values[..., plan.empty_index, None].to(phi.dtype)
    return phi - full * v_full - empty * v_empty



def segment_worth(structure, phi: torch.Tensor) -> torch.Tensor:
    """Each segment's Owen value scaled to the whole answer: ``phi_i * m * |U_i|``, with ``1 / (m |U_i|)`` the
    segment's structural share of ``v(N) - v(empty)`` (its weight in the exact Owen value). What the answer
    would be worth, over the empty one, if all its segments were like this one; for one segment it is
    ``v(N) - v(empty)``. Under rewards that carry no signal its expectation is the same for every segment,
    whatever its union's size: the signed mode compares it across a group
    (:func:`~ospo_fast.advantages.group_segment_advantages`).

    Args:
        structure: the response's :class:`~ospo_fast.CoalitionStructure`; phi: float ``[n]``, its Owen values.
    """
    if structure.num_players == 0:
        return phi
    scale = torch.tensor([structure.num_unions * structure.union_sizes[k] for k in structure.union_of],
                         dtype=phi.dtype, device=phi.device)
    return phi * scale


def spread_credit(
    player_values: Sequence[torch.Tensor] | torch.Tensor,
    token_player: torch.Tensor,
    player_offsets: torch.Tensor | None = None,
    check_indices: bool | None = None,
) -> torch.Tensor:
    """Token credit from the Owen values of each response's segments.

    Args:
        player_values: a list of ``N`` float ``[n_j]`` tensors (the Owen values of response j's segments), or
            a flat float ``[sum n_j]`` tensor with ``player_offsets``.
        token_player: int ``[N, T]``: the player of each completion token, -1 for tokens outside every segment
            (as :func:`ospo_fast.token_player_maps` returns).
        player_offsets: int ``[N + 1]``: response j's values are ``player_values[offsets[j]:offsets[j + 1]]``;
            only with a flat tensor.
        check_indices: check that every index lies in ``[-1, n_j)`` (None: on CPU tensors only, where the check
            costs no device synchronisation).
    Returns:
        float ``[N, T]`` on ``token_player``'s device (float64 when the values are, else float32): each token
        gets its segment's value divided by the segment's token count, so a segment's credit sums to its
        Owen value; tokens with -1 get 0. A segment without any token (e.g. truncated away) contributes nothing.
    """
    if not isinstance(token_player, torch.Tensor):
        raise ValueError(f"token_player: expected an integer tensor [N, T], got {type(token_player).__name__}")
    if token_player.dim() != 2 or token_player.dtype.is_floating_point or token_player.dtype == torch.bool:
        got = f"{token_player.dtype} {list(token_player.shape)}"
        raise ValueError(f"token_player: expected an integer tensor [N, T], got {got}")
    N, T = token_player.shape
    device = token_player.device
    if isinstance(player_values, torch.Tensor):
        if player_offsets is None:
            raise ValueError("player_offsets: required with a flat player_values tensor ([N + 1] start offsets)")
        values = as_real_tensor(player_values, "player_values", integers_to=torch.float32)
        if values.dim() != 1:
            raise ValueError(
                "player_values: expected a flat [sum n_j] tensor or a list of N tensors, "
                f"got shape {list(values.shape)}"
            )
        offsets = torch.as_tensor(player_offsets)
        if offsets.dim() != 1 or offsets.numel() != N + 1 or offsets.dtype.is_floating_point:
            got = f"{offsets.dtype} {list(offsets.shape)}"
            raise ValueError(f"player_offsets: expected integer [N + 1] = [{N + 1}], got {got}")
        offsets = to_device(offsets.to(torch.long), device)
    else:
        if player_offsets is not None:
            raise ValueError("player_offsets: only with a flat player_values tensor; a list carries its own lengths")
        rows = [as_real_tensor(v, f"player_values[{j}]", integers_to=torch.float32)
                for j, v in enumerate(player_values)]
        if len(rows) != N:
            raise ValueError(f"player_values: has {len(rows)} responses, token_player has N={N} rows")
        for j, v in enumerate(rows):
            if v.dim() != 1:
                raise ValueError(f"player_values[{j}]: expected a 1-D tensor [n_j], got shape {list(v.shape)}")
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in rows) else torch.float32
        values = torch.cat([to_device(v.to(dtype), device) for v in rows]) if rows else torch.zeros(0, device=device)
        offsets = to_device(torch.tensor([0] + [v.numel() for v in rows]).cumsum(0), device)  # lengths: from shapes
    values = to_device(values, device)
    P = values.numel()
    if check_indices or (check_indices is None and device.type == "cpu"):
        _check_player_indices(token_player, offsets, P)

    valid = token_player >= 0
    # Tokens outside segments point at an extra slot P holding value 0 (no boolean indexing: it syncs).
    slot = torch.where(valid, offsets[:-1, None] + token_player.long(), P).reshape(-1)
    counts = torch.zeros(P + 1, dtype=values.dtype, device=device)
    counts.index_add_(0, slot, valid.reshape(-1).to(values.dtype))
    padded = torch.cat([values, values.new_zeros(1)])
    return (padded[slot] / counts[slot].clamp(min=1)).view(N, T)


def _check_player_indices(token_player: torch.Tensor, offsets: torch.Tensor, num_values: int) -> None:
    if bool((offsets.diff() < 0).any()) or int(offsets[0]) != 0 or int(offsets[-1]) != num_values:
        raise ValueError(
            f"player_offsets: expected non-decreasing offsets from 0 to len(player_values)={num_values}, "
            f"got {offsets.tolist()}"
        )
    counts = offsets.diff()[:, None]
    bad = (token_player < -1) | (token_player >= counts)
    if bool(bad.any()):
        j, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"token_player: entry [{j}, {t}] = {int(token_player[j, t])} is not a player of response {j} "
            f"(it has {int(counts[j, 0])}; -1 marks tokens outside every segment)"
        )


# ----------------------------------------------------------------------------------------------------
# Attributed texts -> credit on a tokenizer's tokens


@dataclass
class TokenCredit:
    """Per-token credit of a batch of attributed texts (:func:`credit_on_tokens`), padded to ``T``.

    Attributes:
        input_ids: int64 ``[N, T]``: the tokenizer's ids of each text, right-padded with 0.
        attention_mask: int64 ``[N, T]``: 1 for a token, 0 for padding.
        token_player: int64 ``[N, T]``: the segment each token falls in, -1 outside every segment.
        credit: float ``[N, T]``: the segment's Owen value divided by its number of tokens; 0 outside segments.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_player: torch.Tensor
    credit: torch.Tensor


def credit_on_tokens(attributions: Attributions, tokenizer, add_special_tokens: bool = False) -> TokenCredit:
    """Each segment's Owen value spread evenly over the tokens that cover it, for the tokens of ``tokenizer``
    (a Hugging Face fast tokenizer: its offset mappings place the tokens) on each attributed text.

    Tokens outside every segment (tags, a think block, punctuation between segments, special tokens, padding)
    get 0, so each response's credit sums to the sum of its Owen values. The credit lives on the device of the
    Owen values. For a policy's own completion tokens in training, see :func:`attribute_completions`.
    """
    if not isinstance(attributions, Attributions):
        raise ValueError(f"attributions: expected an OwenAttributor's output (Attributions), "
                         f"got {type(attributions).__name__}")
    texts = [a.text for a in attributions]
    try:  # unpadded: a policy's tokenizer often has no padding token
        encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:  # what a slow tokenizer raises for return_offsets_mapping
        raise ValueError(
            f"tokenizer: expected a Hugging Face fast tokenizer (offset mappings), got {type(tokenizer).__name__}"
        ) from None
    ids = encoded["input_ids"]
    input_ids = torch.zeros(len(ids), max(map(len, ids), default=0), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for j, row in enumerate(ids):
        input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[j, : len(row)] = 1
    device = attributions[0].phi.device if len(attributions) else torch.device("cpu")
    token_player = token_player_maps(attributions.segmentations, encoded["offset_mapping"]).to(device)
    credit = spread_credit(attributions.phi, token_player)
    return TokenCredit(input_ids, attention_mask, token_player, credit)
