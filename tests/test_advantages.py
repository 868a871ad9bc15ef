"""Advantages: GRPO normalisation, token credit, and the invariant of each redistribution mode."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from ospo_fast.advantages import (
    DEFAULT_MAX_SHARE,
    Redistribution,
    group_advantages,
    group_segment_advantages,
    redistribute,
)
from ospo_fast.credit import excess_credit, spread_credit
from ospo_fast.plans import exact_plan
from ospo_fast.structure import CoalitionStructure

SHARE_MODES = ["proportional", "rank", "hybrid"]
ALL_MODES = SHARE_MODES


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_batch(seed: int, N: int = 7, T: int = 23, dtype=torch.float64):
    """Advantages [N] (one 0, some negative), signed credit [N, T] and a ragged mask [N, T].

    Rows are left- or right-padded with random lengths 1..T; one row is a single token, one is full.
    """
    g = _gen(seed)
    A = torch.randn(N, generator=g, dtype=dtype)
    A[1] = 0.0
    A[2] = -abs(A[2]) - 0.1
    credit = torch.randn(N, T, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[3], lengths[4] = 1, T
    starts = (torch.rand(N, generator=g) * (T - lengths + 1)).long()
    pos = torch.arange(T)
    mask = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])
    return A, credit, mask


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(1) / mask.sum(1)


# ----------------------------------------------------------------------------------------------------
# group_advantages


@pytest.mark.parametrize("group_size", [1, 3, 8])
def test_group_scale_gives_zero_mean_and_unit_std_per_group(group_size):
    rewards = torch.rand(5 * group_size, generator=_gen(group_size), dtype=torch.float64)
    adv = group_advantages(rewards, group_size, eps=0.0).view(-1, group_size)
    assert_close(adv.mean(1), torch.zeros(5), 0, 1e-12, what="group mean")
    if group_size > 1:
        assert_close(adv.std(1), torch.ones(5), 0, 1e-12, what="group std")


def test_constant_group_gives_exact_zero_not_nan():
    # 0.1 * 3 / 3 != 0.1 in floating point: centring alone would leave 1e-17, and / eps 1e-13.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.4, 0.7, 0.7, 0.7], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 3, scale=scale)
        assert not torch.isnan(adv).any()
        assert (adv[:3] == 0).all() and (adv[6:] == 0).all(), scale
        assert (adv[3:6] != 0).all()


def test_group_of_one_gives_zero():
    assert (group_advantages(torch.rand(5, generator=_gen(0)), 1) == 0).all()


def test_batch_scale_divides_by_the_batch_std():
    rewards = torch.rand(4 * 5, generator=_gen(1), dtype=torch.float64)
    groups = rewards.view(4, 5)
    expected = (groups - groups.mean(1, keepdim=True)) / (rewards.std() + 1e-4)
    assert_close(group_advantages(rewards, 5, scale="batch"), expected.reshape(-1), 1e-12, 1e-12, what="batch")


def test_none_scale_only_centres():
    rewards = torch.rand(3 * 7, generator=_gen(2), dtype=torch.float64)
    groups = rewards.view(3, 7)
    expected = groups - groups.mean(1, keepdim=True)
    assert_close(group_advantages(rewards, 7, scale="none"), expected.reshape(-1), 1e-12, 1e-12, what="none")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(rewards=torch.rand(2, 4), group_size=4), "rewards"),
        (dict(rewards=torch.rand(10), group_size=4), "rewards"),
        (dict(rewards=torch.rand(8), group_size=0), "group_size"),
        (dict(rewards=torch.rand(8), group_size=2.0), "group_size"),
        (dict(rewards=torch.rand(8), group_size=4, scale="std"), "scale"),
        (dict(rewards=torch.rand(8), group_size=4, eps=-1.0), "eps"),
    ],
)
def test_group_advantages_bad_inputs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        group_advantages(**kwargs)


# ----------------------------------------------------------------------------------------------------
# spread_credit


def random_player_map(seed: int, N: int = 5, T: int = 19):
    """Owen values per response (n_j players, some 0) and a token -> player map with -1 gaps."""
    g = _gen(seed)
    sizes = torch.randint(0, 6, (N,), generator=g).tolist()
    values = [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]
    token_player = torch.full((N, T), -1, dtype=torch.long)
    for j, n in enumerate(sizes):
        if n:
            draw = torch.randint(-1, n, (T,), generator=g)
            draw[torch.randperm(T, generator=g)[:n]] = torch.arange(n)  # every player gets >= 1 token
            token_player[j] = draw
    return values, token_player


@pytest.mark.parametrize("seed", range(3))
def test_spread_credit_sums_each_segment_to_its_owen_value(seed):
    values, token_player = random_player_map(seed)
    credit = spread_credit(values, token_player)
    for j, v in enumerate(values):
        for i in range(v.numel()):
            assert credit[j][token_player[j] == i].sum().item() == pytest.approx(v[i].item(), abs=1e-12)
            # evenly: every token of segment i holds the same credit
            assert credit[j][token_player[j] == i].unique().numel() == 1


@pytest.mark.parametrize("seed", range(3))
def test_spread_credit_gives_zero_to_tokens_outside_segments(seed):
    values, token_player = random_player_map(seed)
    credit = spread_credit(values, token_player)
    assert (credit[token_player == -1] == 0).all()


def test_spread_credit_flat_values_with_offsets_match_the_list():
    values, token_player = random_player_map(7)
    offsets = torch.tensor([0] + [v.numel() for v in values]).cumsum(0)
    flat = spread_credit(torch.cat(values), token_player, player_offsets=offsets)
    assert_close(flat, spread_credit(values, token_player), 0, 0, what="flat vs list")
    assert flat.dtype == torch.float64


@pytest.mark.parametrize(
    "args,kwargs,name",
    [
        (([torch.ones(2)], torch.zeros(2, 3, dtype=torch.long)), {}, "player_values"),  # 1 response for 2 rows
        (([torch.ones(2)], torch.tensor([[0, 2]])), {}, "token_player"),  # player 2 of 2
        (([torch.ones(2)], torch.tensor([[0, -2]])), {}, "token_player"),
        (([torch.ones(2)], torch.zeros(1, 3)), {}, "token_player"),  # float map
        ((torch.ones(2), torch.zeros(1, 3, dtype=torch.long)), {}, "player_offsets"),
        ((torch.ones(2), torch.zeros(1, 3, dtype=torch.long)), {"player_offsets": torch.tensor([0, 3])},
         "player_offsets"),
        (([torch.ones(2, 1)], torch.zeros(1, 3, dtype=torch.long)), {}, r"player_values\[0\]"),
    ],
)
def test_spread_credit_bad_inputs_name_the_argument(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        spread_credit(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# redistribute: invariants of the share modes


@pytest.mark.parametrize("mode", SHARE_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_token_mean_equals_the_advantage(mode, seed):
    A, credit, mask = ragged_batch(seed)
    out = redistribute(A, credit, mask, mode=mode)
    assert_close(token_mean(out, mask), A, 1e-12, 1e-12, what=f"{mode} token mean")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_tokens_outside_the_mask_get_zero(mode):
    A, credit, mask = ragged_batch(10)
    out = redistribute(A, credit * 1e3, mask, mode=mode)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("mode", SHARE_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_every_completion_token_keeps_the_sign_of_its_advantage(mode, seed):
    A, credit, mask = ragged_batch(20 + seed)
    out = redistribute(A, credit, mask, mode=mode)
    sign = torch.sign(A)[:, None].expand_as(out)
    assert (torch.sign(out)[mask] == sign[mask]).all()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_zero_reward_response_keeps_a_negative_advantage(mode):
    # The reference code's "potential" factor turned a zero reward into advantage 0 on every token.
    rewards = torch.tensor([0.0, 0.6, 0.9, 0.3, 0.0, 0.0, 0.8, 1.0, 0.5, 0.2], dtype=torch.float64)
    A = group_advantages(rewards, 5)
    _, credit, mask = ragged_batch(3, N=10, T=17)
    credit[0] = -credit[0].abs()  # the zero-reward response's segments lowered the score
    out = redistribute(A, credit, mask, mode=mode)
    for j in (0, 4):
        assert A[j] < 0
        assert token_mean(out, mask)[j] == pytest.approx(A[j].item(), abs=1e-12)
        if mode in SHARE_MODES:
            assert (out[j][mask[j]] < 0).all()


@pytest.mark.parametrize("mode", SHARE_MODES)
def test_no_completion_token_gets_zero(mode):
    # Credit with a single nonzero token and many exact zeros: min-max normalisation would zero the rest.
    A, _, mask = ragged_batch(4)
    A = torch.where(A == 0, torch.ones_like(A), A)
    credit = torch.zeros_like(mask, dtype=torch.float64)
    for j in range(mask.shape[0]):
        credit[j, mask[j].nonzero()[0, 0]] = 3.0 * torch.sign(A[j])
    out = redistribute(A, credit, mask, mode=mode)
    assert (out[mask] != 0).all()
    floor_share = 0.1 * A.abs()[:, None].expand_as(out)  # the default floor: each token keeps >= floor / L
    assert (out.abs()[mask] >= floor_share[mask] * (1 - 1e-12)).all()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_no_credit_gives_the_grpo_advantage_on_every_token(mode):
    A, credit, mask = ragged_batch(5)
    out = redistribute(A, torch.zeros_like(credit), mask, mode=mode)
    expected = torch.where(mask, A[:, None].expand_as(out), torch.zeros_like(out))
    assert_close(out, expected, 0, 0, what=f"{mode} without credit")


@pytest.mark.parametrize("mode", ["proportional", "hybrid"])
def test_no_credit_in_the_advantage_direction_gives_uniform_shares(mode):
    A, credit, mask = ragged_batch(6)
    against = torch.where(A[:, None] >= 0, -credit.abs(), credit.abs())  # every token worked against A
    out = redistribute(A, against, mask, mode=mode)
    expected = torch.where(mask, A[:, None].expand_as(out), torch.zeros_like(out))
    assert_close(out, expected, 0, 0, what=mode)


@pytest.mark.parametrize("seed", range(3))
def test_proportional_shares_follow_positive_directional_credit(seed):
    A, credit, mask = ragged_batch(30 + seed)
    floor = 0.2
    out = redistribute(A, credit, mask, mode="proportional", floor=floor, max_share=None)
    for j in range(A.numel()):
        if A[j] == 0 or mask[j].sum() == 1:
            continue
        u = (torch.sign(A[j]) * credit[j]).clamp(min=0)[mask[j]]
        L = int(mask[j].sum())
        w = floor / L + (1 - floor) * u / u.sum()
        assert_close(out[j][mask[j]], A[j] * L * w, 1e-12, 1e-12, what=f"row {j}")


@pytest.mark.parametrize("seed", range(3))
def test_blame_for_a_negative_advantage_falls_on_the_tokens_that_lowered_the_reward(seed):
    A, credit, mask = ragged_batch(40 + seed)
    A = -A.abs() - 0.1
    for mode in SHARE_MODES:
        out = redistribute(A, credit, mask, mode=mode)
        for j in range(A.numel()):
            tokens = mask[j].nonzero().flatten()
            worst = tokens[credit[j, tokens].argmin()]
            best = tokens[credit[j, tokens].argmax()]
            assert out[j, worst] == out[j][mask[j]].min(), mode  # most negative advantage
            if credit[j, worst] < credit[j, best]:
                assert out[j, worst] < out[j, best], mode


@pytest.mark.parametrize("seed", range(3))
def test_rank_gives_the_highest_credit_token_the_largest_share(seed):
    A, credit, mask = ragged_batch(50 + seed)
    A = A.abs() + 0.1
    out = redistribute(A, credit, mask, mode="rank")
    for j in range(A.numel()):
        tokens = mask[j].nonzero().flatten()
        order = credit[j, tokens].argsort()
        shares = out[j, tokens[order]]
        assert (shares.diff() > 0).all()  # strictly increasing with credit (no ties in randn)


def test_rank_ties_share_the_average_rank():
    A = torch.tensor([2.0], dtype=torch.float64)
    credit = torch.tensor([[0.5, 0.1, 0.5, -1.0, 0.1, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, True, False]])
    out = redistribute(A, credit, mask, mode="rank", floor=0.0, max_share=None)
    ranks = torch.tensor([4.5, 2.5, 4.5, 1.0, 2.5], dtype=torch.float64)
    assert_close(out[0, :5], 2.0 * 5 * ranks / ranks.sum(), 1e-12, 1e-12, what="average ranks")


def test_hybrid_alpha_zero_is_grpo_and_alpha_one_is_proportional():
    A, credit, mask = ragged_batch(8)
    grpo = torch.where(mask, A[:, None].expand(mask.shape), torch.zeros(mask.shape, dtype=A.dtype))
    assert_close(redistribute(A, credit, mask, mode="hybrid", alpha=0.0), grpo, 0, 0, what="alpha=0")
    proportional = redistribute(A, credit, mask, mode="proportional", max_share=None)
    hybrid = redistribute(A, credit, mask, mode="hybrid", alpha=1.0, max_share=None)
    assert_close(hybrid, proportional, 0, 0, what="alpha=1")


def test_hybrid_mixes_proportional_and_uniform_linearly():
    A, credit, mask = ragged_batch(9)
    proportional = redistribute(A, credit, mask, mode="proportional", max_share=None)
    grpo = redistribute(A, credit, mask, mode="hybrid", alpha=0.0)
    mixed = redistribute(A, credit, mask, mode="hybrid", alpha=0.3, max_share=None)
    assert_close(mixed, 0.3 * proportional + 0.7 * grpo, 1e-12, 1e-12, what="hybrid")


# ----------------------------------------------------------------------------------------------------
# redistribute: only segment tokens share out the advantage


def with_segments(seed: int, N: int = 7, T: int = 23):
    """ragged_batch plus a random segment mask inside the completion mask (some rows without segments)."""
    A, credit, mask = ragged_batch(seed, N, T)
    g = _gen(seed + 1000)
    segment = mask & (torch.rand(N, T, generator=g) < 0.6)
    segment[0] = False  # a response with no segment at all
    return A, credit, mask, segment


@pytest.mark.parametrize("mode", SHARE_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_tokens_outside_the_segments_get_exactly_the_advantage(mode, seed):
    A, credit, mask, segment = with_segments(60 + seed)
    out = redistribute(A, credit * 5, mask, mode=mode, segment_mask=segment)
    others = mask & ~segment
    assert (out[others] == A[:, None].expand_as(out)[others]).all()
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("mode", SHARE_MODES)
@pytest.mark.parametrize("max_share", [DEFAULT_MAX_SHARE, None])
@pytest.mark.parametrize("seed", range(3))
def test_segment_tokens_keep_the_advantage_as_their_mean(mode, max_share, seed):
    A, credit, mask, segment = with_segments(70 + seed)
    out = redistribute(A, credit, mask, mode=mode, segment_mask=segment, max_share=max_share)
    has = segment.any(1)
    assert_close(token_mean(out, segment)[has], A[has], 1e-12, 1e-12, what="segment mean")
    assert_close(token_mean(out, mask), A, 1e-12, 1e-12, what="completion mean")


@pytest.mark.parametrize("mode", SHARE_MODES)
@pytest.mark.parametrize("seed", range(4))
def test_one_segment_or_equal_credit_gives_exactly_the_advantage(mode, seed):
    # Nothing to assign: OSPO is GRPO, to the last bit, whatever the think block and tags around it.
    g = _gen(80 + seed)
    N, T = 9, 31
    A = torch.randn(N, generator=g, dtype=torch.float64)
    token_player = torch.full((N, T), -1)
    values = []
    for j in range(N):
        start = int(torch.randint(0, 12, (1,), generator=g))
        if j % 2:  # one segment of random length
            token_player[j, start : start + int(torch.randint(1, 15, (1,), generator=g))] = 0
            values.append(torch.randn(1, generator=g, dtype=torch.float64))
        else:  # three segments of one length, equal Owen values
            length = int(torch.randint(1, 6, (1,), generator=g))
            for k in range(3):
                token_player[j, start + k * (length + 1) : start + k * (length + 1) + length] = k
            values.append(torch.randn(1, generator=g, dtype=torch.float64).expand(3).clone())
    credit = spread_credit(values, token_player)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[:, -3:] = False
    out = redistribute(A, credit, mask, mode=mode, segment_mask=token_player >= 0)
    expected = torch.where(mask, A[:, None].expand(N, T), torch.zeros(N, T, dtype=A.dtype))
    assert torch.equal(out, expected)


def _noise_group_sums(mode: str, structure: list[list[int]], lengths: list[int], groups: int, seed: int):
    """Mean and standard error of each token position's group sum of advantages, under rewards that carry
    no signal: every coalition of every response is worth an independent uniform draw (v(empty) = 0.2, as
    a fixed empty answer would), and the response's reward is v(N).

    Layout of every response: 10 think/tag tokens, the segments (``lengths[i]`` tokens each, one
    punctuation token between them), a closing tag and EOS.
    """
    G = 8
    from ospo_fast.credit import segment_worth

    g = _gen(seed)
    s = CoalitionStructure(structure)
    plan = exact_plan(s)
    values = torch.rand(groups * G, plan.num_coalitions, generator=g, dtype=torch.float64)
    values[:, plan.empty_index] = 0.2
    phi = values @ plan.weight_matrix()
    A = group_advantages(values[:, plan.full_index], G)
    row = [-1] * 10
    for i, n in enumerate(lengths):
        row += [i] * n + ([-1] if i + 1 < len(lengths) else [])
    row += [-1, -1]
    token_player = torch.tensor(row).expand(groups * G, -1)
    if mode == "signed":  # each segment's advantage against its group's segments
        credit = group_segment_advantages([segment_worth(s, p) for p in phi], token_player, G)
    else:  # the excess credit the trainers use, spread over the segment's tokens
        excess = excess_credit(plan, values, phi)
        credit = spread_credit(excess.reshape(-1), token_player,
                               torch.arange(0, groups * G * len(lengths) + 1, len(lengths)))
    mask = torch.ones_like(token_player, dtype=torch.bool)
    out = redistribute(A, credit, mask, mode=mode, segment_mask=token_player >= 0)
    sums = out.view(groups, G, -1).sum(1)
    return sums.mean(0), sums.std(0) / groups**0.5, torch.tensor(row)


@pytest.mark.parametrize("mode", SHARE_MODES + ["signed"])
def test_noise_rewards_move_no_token_class(mode):
    # With rewards that carry no signal, GRPO's group sum of advantages is 0 at every token; OSPO must keep
    # that outside the credit it assigns, or it teaches a task-independent habit (the think block, the tags
    # and EOS used to drift to -1.2 and the answer's tokens to +2.7: answers stopped closing).
    mean, stderr, row = _noise_group_sums(mode, [[0]], [5], groups=2000, seed=1)
    assert mean.abs().max() < 1e-9, mean  # one segment: exactly GRPO
    # Phrases alike, of unequal token lengths, in sentences of unequal sizes (Owen values spread per token
    # used to push the one-token phrase of the one-phrase sentence to +1.6 .. +3.9).
    for structure, lengths in (([[0, 1], [2, 3]], [3, 3, 3, 3]), ([[0, 1], [2, 3]], [1, 4, 2, 3]),
                               ([[0], [1, 2, 3]], [1, 4, 2, 3])):
        mean, stderr, row = _noise_group_sums(mode, structure, lengths, groups=2000, seed=2)
        outside = row < 0
        assert mean[outside].abs().max() < 1e-9, mean  # think, tags, punctuation, EOS: exactly GRPO
        first = 10
        assert abs(float(mean[first])) < 4 * float(stderr[first]) + 0.05, (structure, lengths, mean[first])
        assert (mean[~outside].abs() < 4 * stderr[~outside] + 0.05).all(), (structure, lengths, mean)


def test_redistribution_without_a_segment_mask_would_move_the_think_block():
    # The same noise game with every completion token counted as a segment token: the think block drifts.
    # (What the segment mask is for: this is the behaviour the trainers no longer have.)
    G, groups = 8, 500
    g = _gen(5)
    rewards = torch.rand(groups * G, generator=g, dtype=torch.float64)
    A = group_advantages(rewards, G)
    token_player = torch.tensor([-1] * 10 + [0] * 5 + [-1]).expand(groups * G, -1)
    credit = spread_credit(list((rewards - 0.2)[:, None]), token_player)
    mask = torch.ones_like(token_player, dtype=torch.bool)
    drifting = redistribute(A, credit, mask).view(groups, G, -1).sum(1).mean(0)
    fixed = redistribute(A, credit, mask, segment_mask=token_player >= 0).view(groups, G, -1).sum(1).mean(0)
    assert drifting[0] < -0.5 and drifting[10] > 1.0
    assert fixed.abs().max() < 1e-9


# ----------------------------------------------------------------------------------------------------
# redistribute: the bound on a token's share


@pytest.mark.parametrize("mode", SHARE_MODES)
@pytest.mark.parametrize("max_share", [1.0, 1.7, 4.0])
@pytest.mark.parametrize("seed", range(3))
def test_max_share_bounds_every_token_and_keeps_mean_sign_and_order(mode, max_share, seed):
    A, credit, mask, segment = with_segments(90 + seed, N=9, T=41)
    credit = credit**3  # heavy-tailed credit: some rows far beyond the bound
    free = redistribute(A, credit, mask, mode=mode, segment_mask=segment, max_share=None)
    out = redistribute(A, credit, mask, mode=mode, segment_mask=segment, max_share=max_share)
    A_t = A[:, None].expand_as(out)
    assert (out.abs()[mask] <= max_share * A_t.abs()[mask] * (1 + 1e-12)).all()
    assert_close(token_mean(out, mask), A, 1e-12, 1e-12, what="mean")
    assert (torch.sign(out)[mask] == torch.sign(A_t)[mask]).all()
    for j in range(A.numel()):  # pulled towards uniform: the order of the shares is kept
        tokens = segment[j].nonzero().flatten()
        if A[j] != 0 and len(tokens) > 1:
            order = free[j, tokens].argsort()
            assert (out[j, tokens[order]].diff() >= -1e-12).all()
    within = (free.abs() <= max_share * A_t.abs()).all(1)
    assert torch.equal(out[within], free[within])  # rows inside the bound are untouched


def test_potential_mode_is_refused_with_a_pointer_to_why():
    A, credit, mask = ragged_batch(1)
    with pytest.raises(ValueError, match="potential.*removed"):
        redistribute(A, credit, mask, mode="potential")


# ----------------------------------------------------------------------------------------------------
# Credit after a <think> block, clipping, checks


@pytest.mark.parametrize("mode", SHARE_MODES)
def test_credit_after_a_think_block_lands_on_the_answer_tokens(mode):
    # 9 think tokens (player -1: the segmenter segments only the answer), then 3 segments over 8 tokens.
    token_player = torch.tensor([[-1] * 9 + [0, 0, 0, -1, 1, 1, 2, 2]])
    mask = torch.ones_like(token_player, dtype=torch.bool)
    for A, phi in ((1.5, [0.6, 0.3, 0.1]), (-1.5, [-0.6, -0.3, -0.1])):
        credit = spread_credit([torch.tensor(phi)], token_player)
        out = redistribute(torch.tensor([A]), credit, mask, mode=mode, segment_mask=token_player >= 0)
        assert (out[0, token_player[0] < 0] == A).all()  # the think block and the comma: GRPO
        assert out[0, 9:12].abs().min() > abs(A) > out[0, 15:17].abs().max()  # the best segment gets most


@pytest.mark.parametrize("mode", ALL_MODES)
def test_clip_bounds_the_advantages_of_completion_tokens(mode):
    A, credit, mask = ragged_batch(13)
    out = redistribute(A * 3, credit, mask, mode=mode, clip=0.5)
    assert out.abs().max() <= 0.5
    asym = redistribute(A * 3, credit, mask, mode=mode, clip=(-0.2, 1.0))
    assert asym[mask].min() >= -0.2 and asym.max() <= 1.0
    assert (asym[~mask] == 0).all()
    unclipped = redistribute(A * 3, credit, mask, mode=mode)
    assert_close(asym, torch.where(mask, unclipped.clamp(-0.2, 1.0), 0.0), 0, 0, what="clip applied last")


def test_check_finite_false_skips_the_value_check():
    A, credit, mask = ragged_batch(14)
    A[0] = float("nan")
    out = redistribute(A, credit, mask, check_finite=False)
    assert torch.isnan(out[0][mask[0]]).all()


def _bad(**changes):
    A, credit, mask = ragged_batch(15)
    args = dict(advantages=A, token_credit=credit, completion_mask=mask)
    args.update(changes)
    return args


def _with_nan(x, index):
    x = x.clone()
    x[index] = float("nan")
    return x


_A, _C, _M = ragged_batch(15)
_FIRST = tuple(int(i) for i in _M.nonzero()[0])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (_bad(advantages=_A[:, None]), "advantages"),
        (_bad(advantages=_A[:-1]), "token_credit"),
        (_bad(token_credit=_C[:, :, None]), "token_credit"),
        (_bad(completion_mask=_M[:, :-1]), "completion_mask"),
        (_bad(mode="uniform"), "mode"),
        (_bad(mode="hybrid", alpha=1.5), "alpha"),
        (_bad(floor=-0.1), "floor"),
        (_bad(clip=0.0), "clip"),
        (_bad(clip=(1.0, -1.0)), "clip"),
        (_bad(clip="big"), "clip"),
        (_bad(max_share=0.5), "max_share"),
        (_bad(segment_mask=_M[:, :-1]), "segment_mask"),
        (_bad(segment_mask=[[True]]), "segment_mask"),
        (_bad(advantages=_with_nan(_A, 3)), "advantages"),
        (_bad(token_credit=_with_nan(_C, _FIRST)), "token_credit"),
        (_bad(advantages=torch.ones(7, dtype=torch.bool)), "advantages"),
    ],
)
def test_redistribute_bad_inputs_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        redistribute(**kwargs)


def test_float32_inputs_give_float32_and_float64_give_float64():
    A, credit, mask = ragged_batch(16)
    assert redistribute(A.float(), credit.float(), mask).dtype == torch.float32
    assert redistribute(A.float(), credit, mask.float()).dtype == torch.float64


# ----------------------------------------------------------------------------------------------------
# signed: each segment's advantage against its group's segments


def _worth_game(groups: int, structure, seed: int, G: int = 8, signal=None):
    """Random games of one structure: per-response Owen values, segment worth and rewards (v(N))."""
    from ospo_fast.credit import segment_worth

    g = _gen(seed)
    s = CoalitionStructure(structure)
    plan = exact_plan(s)
    values = torch.rand(groups * G, plan.num_coalitions, generator=g, dtype=torch.float64)
    if signal is not None:
        values = signal(plan.masks.double())[None, :].expand_as(values) + 0.05 * values
    values[:, plan.empty_index] = 0.2
    phi = values @ plan.weight_matrix()
    worth = [segment_worth(s, p) for p in phi]
    return plan, values, phi, worth


def test_signed_group_of_one_segment_answers_is_grpo():
    plan, values, phi, worth = _worth_game(50, [[0]], seed=3)
    token_player = torch.tensor([-1, -1, 0, 0, 0, -1]).expand(len(worth), -1)
    a = group_segment_advantages(worth, token_player, 8)
    A = group_advantages(values[:, plan.full_index], 8)
    torch.testing.assert_close(a[:, 2], A, rtol=0, atol=1e-9)
    assert torch.equal(a[:, [0, 1, 5]], torch.zeros(len(worth), 3, dtype=a.dtype))
    out = redistribute(A, a, torch.ones_like(token_player, dtype=torch.bool), mode="signed",
                       segment_mask=token_player >= 0)
    torch.testing.assert_close(out, A[:, None].expand_as(out), rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_signed_tokens_outside_the_segments_get_exactly_the_advantage(seed):
    A, credit, mask = ragged_batch(seed)
    segment = torch.rand(mask.shape, generator=_gen(seed)) < 0.6
    out = redistribute(A, credit, mask, mode="signed", segment_mask=segment)
    outside = mask & ~segment
    assert torch.equal(out[outside], A[:, None].expand_as(out)[outside])
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_signed_mixes_the_advantage_and_the_segment_advantage_by_its_weight(weight):
    A, credit, mask = ragged_batch(4)
    out = redistribute(A, credit, mask, mode="signed", segment_weight=weight)
    expected = torch.where(mask, (1 - weight) * A[:, None] + weight * credit, torch.zeros_like(credit))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_signed_flips_the_sign_of_a_decoy_inside_a_better_than_average_answer():
    # An additive reward: the request phrase is worth +0.5, the hint +0.4, the decoy -0.1. Half the group keeps
    # the decoy. A decoy kept beside a hint in a better-than-average answer must still be pushed down; the paper's
    # shares keep every token of that answer positive.
    from ospo_fast.credit import segment_worth, spread_credit

    weights = {"request": 0.5, "hint": 0.4, "decoy": -0.1}
    layouts = [["request", "hint", "decoy"], ["request", "hint"], ["request", "decoy"], ["request"]] * 2
    phi = [torch.tensor([weights[k] for k in layout], dtype=torch.float64) for layout in layouts]
    rewards = torch.tensor([0.2 + float(p.sum()) for p in phi], dtype=torch.float64)
    structures = [CoalitionStructure([list(range(len(layout)))]) for layout in layouts]
    worth = [segment_worth(s, p) for s, p in zip(structures, phi)]
    T = 3
    token_player = torch.tensor([[k if k < len(layout) else -1 for k in range(T)] for layout in layouts])
    mask = token_player >= 0
    A = group_advantages(rewards, len(layouts))
    a = group_segment_advantages(worth, token_player, len(layouts))
    signed = redistribute(A, a, mask, mode="signed", segment_mask=mask)
    shares = redistribute(A, spread_credit(phi, token_player), mask, mode="proportional", segment_mask=mask)
    assert A[0] > 0 and signed[0, 2] < 0 < shares[0, 2]  # the decoy of "request, hint, decoy"
    assert A[2] < 0 and signed[1, 1] > 0  # the hint of "request, hint" is pushed up
    assert signed[3, 0] > signed[2, 1]  # the request alone beats the decoy beside it


def test_group_segment_advantages_take_group_ids_in_any_order():
    plan, values, phi, worth = _worth_game(6, [[0, 1], [2]], seed=5, G=4)
    token_player = torch.tensor([0, 0, 1, -1, 2]).expand(len(worth), -1)
    by_size = group_segment_advantages(worth, token_player, 4)
    order = torch.randperm(len(worth), generator=_gen(1))
    ids = (torch.arange(len(worth)) // 4)[order]
    by_ids = group_segment_advantages([worth[i] for i in order.tolist()], token_player, ids)
    torch.testing.assert_close(by_ids, by_size[order], rtol=0, atol=1e-12)


def test_group_segment_advantages_give_zero_to_a_group_whose_segments_are_alike():
    worth = [torch.full((3,), 0.4, dtype=torch.float64) for _ in range(4)]
    token_player = torch.tensor([0, 1, 2]).expand(4, -1)
    assert torch.equal(group_segment_advantages(worth, token_player, 4), torch.zeros(4, 3, dtype=torch.float64))


def test_signed_mode_without_groups_is_refused_naming_groups():
    from ospo_fast.credit import CompletionCredit, token_advantages

    credit = CompletionCredit([], [], None, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), [])
    with pytest.raises(ValueError, match="^groups: mode='signed'"):
        token_advantages(torch.zeros(0), torch.zeros(0, 3), credit, Redistribution(mode="signed"))


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), True])
def test_signed_segment_weight_outside_zero_one_is_refused(weight):
    with pytest.raises(ValueError, match="^segment_weight: expected a finite number in"):
        Redistribution(mode="signed", segment_weight=weight)
