"""Coalition plans: what is evaluated, how often, and the sampled estimator's statistics."""

from __future__ import annotations

import dataclasses
import pickle
import re

import numpy as np
import pytest
import torch
from conftest import random_game, random_structure

import ospo_fast as of
import ospo_fast.plans as plans_module
from ospo_fast.plans import PlanCache
from ospo_fast.plans import cache as cache_module
from ospo_fast.plans import sampled as sampled_module


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sizes", [[1], [3], [2, 3], [3, 3, 3], [4, 4, 4], [1, 5, 2, 1]])
def test_exact_plan_holds_each_coalition_once_and_the_formula_count(sizes):
    s = of.CoalitionStructure.from_sizes(sizes)
    plan = of.exact_plan(s)
    assert plan.num_coalitions == of.num_exact_coalitions(s)
    assert torch.unique(plan.masks, dim=0).shape[0] == plan.num_coalitions


def test_three_sentences_of_three_phrases_need_80_coalitions():
    assert of.exact_plan(of.CoalitionStructure.from_sizes([3, 3, 3])).num_coalitions == 80


def test_exact_plan_coalitions_are_unions_of_unions_plus_part_of_one_union():
    s = of.CoalitionStructure([[0, 1, 2], [3, 4], [5, 6, 7]])
    for mask in of.exact_plan(s).masks:
        partial = [k for k, u in enumerate(s.unions) if 0 < int(mask[list(u)].sum()) < len(u)]
        assert len(partial) <= 1


def test_empty_and_grand_coalitions_are_first_and_last():
    for plan in (of.exact_plan(of.CoalitionStructure([[0, 1], [2]])),
                 of.sampled_plan(of.CoalitionStructure([[0, 1], [2]]), 5)):
        assert not plan.masks[plan.empty_index].any()
        assert plan.masks[plan.full_index].all()


@pytest.mark.parametrize("n", [1, 5, 9])
def test_coalition_keys_are_the_masks_as_bits(n):
    plan = of.exact_plan(random_structure(n, _gen(n)))
    keys = plan.coalition_keys()
    bits = (keys[:, None] >> np.arange(plan.num_players)) & 1
    assert keys.dtype == np.int64 and np.array_equal(bits.astype(bool), plan.masks.numpy())
    assert len(set(keys.tolist())) == plan.num_coalitions  # distinct coalitions, distinct keys
    assert plan.coalition_keys() is keys  # computed once


def test_weight_matrix_gives_the_same_values_as_the_terms():
    s = of.CoalitionStructure([[0, 2], [1, 3, 4]])
    plan = of.exact_plan(s)
    values = torch.randn(6, plan.num_coalitions, dtype=torch.float64, generator=_gen(0))
    torch.testing.assert_close(values @ plan.weight_matrix(), of.owen_from_values(plan, values, backend="torch"))


def test_plans_are_cached_per_structure():
    s1 = of.CoalitionStructure([[0, 1], [2, 3]])
    s2 = of.CoalitionStructure([[0, 1], [2, 3]])
    assert of.exact_plan(s1) is of.exact_plan(s2)
    assert of.sampled_plan(s1, 8, seed=4) is of.sampled_plan(s2, 8, seed=4)


def test_sampled_plan_same_seed_same_plan_different_seed_different_plan():
    s = of.CoalitionStructure.from_sizes([3, 4, 2, 5])
    a = of.owen_orders(s, 16, seed=7)
    b = of.owen_orders(s, 16, seed=7)
    c = of.owen_orders(s, 16, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampled_orders_are_stable_across_machines_and_versions():
    # PCG64 streams are platform-independent; this pins them so a change of generator is noticed.
    orders = of.owen_orders(of.CoalitionStructure([[0, 1], [2, 3, 4]]), 4, seed=0)
    assert orders.tolist() == PINNED_ORDERS


PINNED_ORDERS = [[4, 2, 3, 0, 1], [1, 0, 3, 2, 4], [2, 4, 3, 1, 0], [0, 1, 3, 4, 2]]


@pytest.mark.parametrize("antithetic", [False, True])
def test_sampled_orders_are_owen_consistent(antithetic):
    s = of.CoalitionStructure([[5, 0], [2, 4, 1], [3]])
    for order in of.owen_orders(s, 50, seed=1, antithetic=antithetic):
        unions = [s.union_of[p] for p in order]
        # each union's players arrive together: the union sequence changes value exactly m-1 times
        assert sum(a != b for a, b in zip(unions, unions[1:])) == s.num_unions - 1
        assert sorted(order.tolist()) == list(range(s.num_players))


def test_antithetic_orders_come_in_reversed_pairs():
    orders = of.owen_orders(of.CoalitionStructure.from_sizes([2, 3, 1]), 6, seed=2, antithetic=True)
    for a, b in zip(orders[0::2], orders[1::2]):
        assert a.tolist() == b[::-1].tolist()


def test_sampled_plan_evaluates_each_coalition_once():
    s = of.CoalitionStructure.from_sizes([2, 2])  # few coalitions, so orders repeat them
    plan = of.sampled_plan(s, 64, seed=0)
    assert torch.unique(plan.masks, dim=0).shape[0] == plan.num_coalitions
    assert plan.num_coalitions <= of.num_exact_coalitions(s)


def test_sampled_estimate_is_unbiased():
    g = _gen(3)
    s = random_structure(6, g)
    game = random_game(6, g)
    exact = of.owen_values(game, s, method="exact")
    estimates = torch.stack(
        [of.owen_values(game, s, method="sampled", num_permutations=3, seed=seed, antithetic=False)
         for seed in range(600)]
    )
    stderr = estimates.std(0) / 600**0.5
    assert ((estimates.mean(0) - exact).abs() <= 4.5 * stderr + 1e-12).all()


def _rmse(game, s, K, antithetic, seeds=120):
    exact = of.owen_values(game, s, method="exact")
    errors = [
        (of.owen_values(game, s, method="sampled", num_permutations=K, seed=seed, antithetic=antithetic) - exact)
        .pow(2)
        .mean()
        for seed in range(seeds)
    ]
    return torch.stack(errors).mean().sqrt().item()


def test_sampled_error_shrinks_like_one_over_sqrt_k():
    g = _gen(4)
    s = of.CoalitionStructure.from_sizes([2, 3, 2])
    game = random_game(7, g)
    ratio = _rmse(game, s, 4, antithetic=False) / _rmse(game, s, 64, antithetic=False)
    assert 2.5 < ratio < 6.5  # sqrt(64 / 4) = 4


def test_antithetic_sampling_no_worse_than_plain():
    s = of.CoalitionStructure.from_sizes([2, 3, 2])
    w = torch.rand(7, dtype=torch.float64, generator=_gen(5)) + 0.1

    def saturating(masks):  # a retrieval-like reward: diminishing returns in the kept segments
        return (masks.double() @ w).sqrt()

    plain = _rmse(saturating, s, 8, antithetic=False)
    anti = _rmse(saturating, s, 8, antithetic=True)
    assert anti <= plain * 1.05


def test_plan_batch_offsets_and_split():
    plans = [of.exact_plan(of.CoalitionStructure.from_sizes(sz)) for sz in ([2], [1, 2], [3])]
    batch = of.PlanBatch(plans)
    assert batch.num_values == sum(p.num_coalitions for p in plans)
    assert batch.num_rows == 8
    assert [t.numel() for t in batch.split(torch.zeros(batch.num_rows))] == [2, 3, 3]


# ----------------------------------------------------------------------------------------------------
# The caches: bounded, least recently used evicted first, counted


def test_plan_cache_evicts_the_least_recently_used_entry_not_all():
    cache = PlanCache(maxsize=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now more recent than "b"
    cache.put("c", 3)
    assert len(cache) == 2 and "a" in cache and "c" in cache and "b" not in cache


def test_plan_cache_returns_the_same_object_on_a_hit_and_counts_hits_and_misses():
    cache, builds = PlanCache(maxsize=4), []
    first = cache.get_or_build("k", lambda: builds.append(1) or object())
    assert cache.get_or_build("k", lambda: builds.append(1) or object()) is first
    assert cache.get("other") is None
    assert (len(builds), cache.hits, cache.misses) == (1, 1, 2)
    cache.clear()
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)
    assert cache.get_or_build("k", object) is not first


@pytest.mark.parametrize("maxsize", [0, -1, 1.5, True, None])
def test_plan_cache_size_must_be_a_positive_int(maxsize):
    with pytest.raises(ValueError, match=r"^maxsize: expected a positive int"):
        PlanCache(maxsize)


def test_plans_come_back_from_the_plan_cache_and_its_bound_holds(monkeypatch):
    cache = PlanCache(maxsize=2)
    monkeypatch.setattr(cache_module, "plan_cache", cache)
    s1, s2, s3 = (of.CoalitionStructure.from_sizes(sizes) for sizes in ([2], [1, 2], [3]))
    p1, p2 = of.exact_plan(s1), of.sampled_plan(s2, 4, seed=1)
    assert of.exact_plan(s1) is p1 and of.sampled_plan(s2, 4, seed=1) is p2
    assert (cache.hits, cache.misses) == (2, 2)
    of.exact_plan(of.CoalitionStructure.from_sizes([2]))  # an equal structure is a hit: s1 is the most recent
    of.exact_plan(s3)  # evicts s2's plan only
    assert len(cache) == 2 and of.exact_plan(s1) is p1
    assert of.sampled_plan(s2, 4, seed=1) is not p2  # rebuilt, equal
    assert torch.equal(of.sampled_plan(s2, 4, seed=1).masks, p2.masks)


def test_plans_drawn_from_a_generator_stay_out_of_the_plan_cache(monkeypatch):
    cache = PlanCache(maxsize=8)
    monkeypatch.setattr(cache_module, "plan_cache", cache)
    of.sampled_plan(of.CoalitionStructure.from_sizes([2, 2]), 4, rng=np.random.default_rng(0))
    assert len(cache) == 0


def test_kernel_args_are_copied_once_per_device_and_dtype():
    batch = of.PlanBatch([of.exact_plan(of.CoalitionStructure.from_sizes(sizes)) for sizes in ([2], [1, 2])])
    cpu = torch.device("cpu")
    args64 = batch.kernel_args(cpu, torch.float64)
    assert batch.kernel_args(cpu, torch.float64) is args64
    args32 = batch.kernel_args(cpu, torch.float32)
    assert args32 is not args64 and args32[-1].dtype == torch.float32
    assert batch.kernel_args(cpu, torch.float32) is args32
    assert (len(batch.cache), batch.cache.misses, batch.cache.hits) == (2, 2, 2)


def test_a_plan_prepares_each_values_shape_once_and_keeps_a_bounded_number():
    plan = of.exact_plan(of.CoalitionStructure.from_sizes([2, 3]))
    plan = dataclasses.replace(plan)  # a plan of its own, with an empty cache
    values = torch.randn(3, plan.num_coalitions, dtype=torch.float64, generator=_gen(0))
    first = of.owen_from_values(plan, values)
    size, misses = len(plan.cache), plan.cache.misses
    for _ in range(3):
        torch.testing.assert_close(of.owen_from_values(plan, values), first)
    assert (len(plan.cache), plan.cache.misses) == (size, misses)
    for games in range(1, 2 * plans_module.PER_PLAN_CACHE_SIZE):
        of.owen_from_values(plan, torch.zeros(games, plan.num_coalitions))
    assert len(plan.cache) == plans_module.PER_PLAN_CACHE_SIZE
    torch.testing.assert_close(of.owen_from_values(plan, values), first)


def test_a_copied_or_pickled_plan_starts_with_an_empty_cache():
    plan = dataclasses.replace(of.exact_plan(of.CoalitionStructure.from_sizes([2, 2])))
    of.owen_from_values(plan, torch.zeros(plan.num_coalitions))
    assert len(plan.cache) > 0
    for copy in (pickle.loads(pickle.dumps(plan)), dataclasses.replace(plan)):
        assert len(copy.cache) == 0 and copy.cache.maxsize == plan.cache.maxsize
        torch.testing.assert_close(of.owen_from_values(copy, torch.ones(plan.num_coalitions)),
                                   of.owen_from_values(plan, torch.ones(plan.num_coalitions)))


# ----------------------------------------------------------------------------------------------------
# Fresh draws: sampled plans from a numpy Generator, and the attributor's generator across calls


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _same_plan(a, b) -> bool:
    return (
        a.method == b.method
        and a.num_permutations == b.num_permutations
        and all(
            torch.equal(getattr(a, f), getattr(b, f))
            for f in ("masks", "player_ptr", "term_plus", "term_minus", "term_weight")
        )
    )


def test_orders_from_a_generator_are_fresh_on_each_call_and_those_of_its_seed_on_the_first():
    s = of.CoalitionStructure.from_sizes([3, 4, 2])
    rng = _rng(7)
    first, second = of.owen_orders(s, 8, rng=rng), of.owen_orders(s, 8, rng=rng)
    np.testing.assert_array_equal(first, of.owen_orders(s, 8, seed=7))  # same stream as seed=7
    assert not np.array_equal(first, second)
    for orders in (first, second):  # antithetic pairs with fresh draws too
        for a, b in zip(orders[0::2], orders[1::2]):
            assert a.tolist() == b[::-1].tolist()


def test_sampled_plan_from_a_generator_is_fresh_and_not_cached():
    s = of.CoalitionStructure.from_sizes([4, 4])
    rng = _rng(0)
    a = of.sampled_plan(s, 4, rng=rng)
    b = of.sampled_plan(s, 4, rng=rng)
    assert a is not b and not _same_plan(a, b)
    assert _same_plan(a, of.sampled_plan(s, 4, seed=0))  # the first draw of PCG64(0) is seed 0's plan
    c = of.make_plan(s, "sampled", num_permutations=4, rng=rng)
    assert c is not of.make_plan(s, "sampled", num_permutations=4, rng=rng)


def test_exact_plans_stay_cached_with_a_generator():
    s = of.CoalitionStructure.from_sizes([2, 3])
    rng = _rng(1)
    state = rng.bit_generator.state
    assert of.make_plan(s, "exact", rng=rng) is of.exact_plan(s)
    assert of.make_plan(s, "auto", budget=256, rng=rng) is of.exact_plan(s)
    assert all(p is of.exact_plan(s) for p in of.plans.make_plans([s, s], "auto", budget=256, rng=rng))
    assert rng.bit_generator.state == state  # exact plans draw nothing


@pytest.mark.parametrize("chunk_terms", [None, 1, 40])
def test_make_plans_draws_what_successive_make_plan_calls_draw(chunk_terms, monkeypatch):
    """One vectorised draw for a list of structures (mixed sizes, unions and K, repeats, no players, 40 and
    64 players) gives, plan by plan, bit for bit, what make_plan(rng=...) called in turn gives, and leaves the
    generator in the same state; however the construction is cut into chunks of games."""
    if chunk_terms is not None:
        monkeypatch.setattr(sampled_module, "_CHUNK_TERMS", chunk_terms)
    g = _gen(11)
    structures = [random_structure(int(torch.randint(1, 13, (1,), generator=g)), g) for _ in range(30)]
    structures += [structures[0], of.CoalitionStructure([]), of.CoalitionStructure.from_sizes([10, 30]),
                   of.CoalitionStructure.from_sizes([64])]
    for antithetic in (True, False):
        for method, options in (("auto", dict(budget=24)), ("sampled", dict(num_permutations=5))):
            batched_rng, one_by_one_rng = _rng(3), _rng(3)
            batched = of.plans.make_plans(structures, method, antithetic=antithetic, rng=batched_rng, **options)
            for s, plan in zip(structures, batched):
                expected = of.make_plan(s, method, antithetic=antithetic, rng=one_by_one_rng, **options)
                assert plan is expected if expected.method == "exact" else _same_plan(plan, expected)
                assert plan.structure == s and plan.masks.is_contiguous()
            assert batched_rng.bit_generator.state == one_by_one_rng.bit_generator.state
            assert sum(p.method == "sampled" for p in batched) > len(structures) // 2


@pytest.mark.parametrize("antithetic", [False, True])
def test_mean_of_fresh_sampled_estimates_converges_to_the_owen_value(antithetic):
    """Estimates from plans drawn fresh from one generator average out to the exact Owen value, whereas
    the cached plan of a fixed seed repeats the same error however many times it is used."""
    g = _gen(3)
    s = random_structure(7, g)
    game = random_game(7, g)
    exact = of.owen_values(game, s, method="exact")
    rng = _rng(0)
    calls = 600

    def estimate(plan):
        return of.owen_from_values(plan, game(plan.masks))

    options = dict(num_permutations=4, antithetic=antithetic)
    estimates = torch.stack([estimate(of.make_plan(s, "sampled", rng=rng, **options)) for _ in range(calls)])
    tolerance = 4.5 * estimates.std(0) / calls**0.5 + 1e-12
    assert ((estimates.mean(0) - exact).abs() <= tolerance).all()
    fixed = estimate(of.make_plan(s, "sampled", seed=0, **options))
    assert ((fixed - exact).abs() > 3 * tolerance).any()  # the seeded plan's bias, the same on every call


def _words(text: str) -> of.Segmentation:
    """Each word a player; each sentence ('.') a union."""
    spans, sizes = [], []
    for sentence in re.finditer(r"[^.]+", text):
        words = [(sentence.start() + m.start(), sentence.start() + m.end())
                 for m in re.finditer(r"\w+", sentence.group())]
        if words:
            spans += words
            sizes.append(len(words))
    return of.Segmentation(text, tuple(spans), of.CoalitionStructure.from_sizes(sizes))


def _symmetric_reward(texts, owners):
    """v(S) = sqrt(|S| / 8), concave in the number of kept words (so that neither an order nor its reverse
    gives every player the same marginal contribution): every player of a symmetric 8-player structure
    has the Owen value (v(N) - v(empty)) / 8."""
    return torch.tensor([(len(re.findall(r"\w+", t)) / 8) ** 0.5 for t in texts], dtype=torch.float64)


def _texts(call: int, count: int = 8) -> list[str]:
    """``count`` distinct texts of two sentences of four words (2 unions of 4 players each)."""
    first = [" ".join(f"w{call}x{j}y{k}" for k in range(4)) for j in range(count)]
    return [f"{words}. " + " ".join(f"v{j}z{k}" for k in range(4)) + "." for j, words in enumerate(first)]


def _attributor(seed=0, **options):
    options = dict(method="sampled", num_permutations=4, segmenter=_words, seed=seed) | options
    return of.OwenAttributor(_symmetric_reward, **options)


def test_attributor_sampled_estimates_average_to_the_owen_value_over_calls():
    """A symmetric 8-player game (2 unions of 4, v(S) = sqrt(|S| / 8)): each player's Owen value is
    (1 - 0) / 8 = 0.125. K=4 orders per plan; over many training-like calls (8 responses of that shape
    each) the mean estimate converges to it, as the attributor draws fresh orders every call."""
    attributor = _attributor()
    exact = of.OwenAttributor(_symmetric_reward, method="exact", segmenter=_words)(_texts(0, 1), [0])[0].phi
    torch.testing.assert_close(exact, torch.full((8,), 0.125, dtype=exact.dtype))
    estimates = torch.stack([a.phi for call in range(60) for a in attributor(_texts(call), [0] * 8)])
    tolerance = 4.5 * estimates.std(0) / estimates.shape[0] ** 0.5 + 1e-12
    assert ((estimates.mean(0) - exact).abs() <= tolerance).all(), (estimates.mean(0), tolerance)
    assert len({tuple(e.tolist()) for e in estimates}) > 10  # fresh orders: the estimates vary


def test_attributor_draws_fresh_orders_on_each_call():
    attributor = _attributor()
    text = _texts(0, 1)
    first, second = attributor(text, [0])[0], attributor(text, [0])[0]
    assert not torch.equal(first.phi, second.phi)
    assert first.plan.masks.shape != second.plan.masks.shape or not torch.equal(first.plan.masks, second.plan.masks)


def test_attributor_draws_the_plans_of_make_plans_over_its_distinct_texts():
    """A call's sampled plans: make_plans over its distinct texts in first-occurrence order, from the
    attributor's generator; a repeated text shares the first occurrence's plan."""
    texts = _texts(0, 3)
    texts = [texts[0], texts[1], texts[0], texts[2], texts[1]]
    out = _attributor(seed=5)(texts, [0] * 5)
    distinct = [_words(t).structure for t in (texts[0], texts[1], texts[3])]
    expected = of.plans.make_plans(distinct, "sampled", num_permutations=4, rng=_rng(5))
    for j, plan in zip([0, 1, 3], expected):
        assert _same_plan(out[j].plan, plan)
    assert out[2].plan is out[0].plan and out[4].plan is out[1].plan


def _assert_same_attributions(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.plan.masks, y.plan.masks) and torch.equal(x.phi, y.phi)


def test_attributors_with_the_same_seed_repeat_the_same_sequence_of_calls():
    """Three calls on the same batch: each call draws other plans, yet a second attributor with the same
    seed repeats the three exactly; another seed draws other plans."""
    a, b, c = _attributor(seed=3), _attributor(seed=3), _attributor(seed=4)
    batch = (_texts(0, 3), [0, 1, 0])
    outs_a = [a(*batch) for _ in range(3)]
    outs_b = [b(*batch) for _ in range(3)]
    outs_c = [c(*batch) for _ in range(3)]
    for x, y in zip(outs_a, outs_b):
        _assert_same_attributions(x, y)
    for x, y in zip(outs_a, outs_a[1:]):
        assert not torch.equal(x[0].phi, y[0].phi)
    for out_a, out_c in zip(outs_a, outs_c):
        assert not torch.equal(out_a[0].phi, out_c[0].phi)


@pytest.mark.parametrize("round_trip", ["torch", "pickle"])
def test_attributor_state_resumes_the_sequence(round_trip, tmp_path):
    """A makes two calls and saves its state; B (another seed) loads it: B's first call is A's third."""
    a = _attributor(seed=0)
    a(_texts(0, 2), [0, 0])
    a(_texts(1, 2), [0, 0])
    state = a.state_dict()
    if round_trip == "torch":
        torch.save({"attributor": state}, tmp_path / "ckpt.pt")
        state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["attributor"]
    else:
        state = pickle.loads(pickle.dumps(state))
    b = _attributor(seed=99)
    b.load_state_dict(state)
    _assert_same_attributions(b(_texts(2, 2), [0, 0]), a(_texts(2, 2), [0, 0]))


def test_state_dict_is_a_snapshot():
    a = _attributor(seed=0)
    state = a.state_dict()
    first = a(_texts(0, 1), [0])
    a.load_state_dict(state)
    _assert_same_attributions(a(_texts(0, 1), [0]), first)


@pytest.mark.parametrize("rng", [0, np.random.RandomState(0), torch.Generator(), "rng"])
def test_rng_must_be_a_numpy_generator(rng):
    s = of.CoalitionStructure.from_sizes([2, 2])
    for call in (
        lambda: of.owen_orders(s, 4, rng=rng),
        lambda: of.sampled_plan(s, 4, rng=rng),
        lambda: of.make_plan(s, "sampled", rng=rng),
        lambda: of.make_plan(s, "exact", rng=rng),
        lambda: of.plans.make_plans([s], rng=rng),
    ):
        with pytest.raises(ValueError, match=r"rng: expected a numpy.random.Generator"):
            call()


_MT_STATE = np.random.Generator(np.random.MT19937(0)).bit_generator.state


@pytest.mark.parametrize(
    "state",
    [None, [], {}, {"rng": 5}, {"rng": _MT_STATE}, {"rng": {"bit_generator": "PCG64", "state": "x"}},
     {"rng": _rng(0).bit_generator.state, "extra": 1}, {"model": {}}],
)
def test_load_state_dict_checks_its_argument_and_changes_nothing_when_bad(state):
    a = _attributor(seed=0)
    before = a.state_dict()
    with pytest.raises(ValueError, match=r"^state: "):
        a.load_state_dict(state)
    assert a.state_dict() == before


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0", None])
def test_attributor_seed_must_be_a_non_negative_int(seed):
    with pytest.raises(ValueError, match=r"seed: expected a non-negative int"):
        _attributor(seed=seed)


def test_attributor_exact_plans_are_cached_across_calls():
    attributor = _attributor(method="exact")
    state = attributor.state_dict()
    first, second = attributor(_texts(0, 1), [0]), attributor(_texts(1, 1), [0])
    assert first[0].plan is second[0].plan is of.exact_plan(first[0].segmentation.structure)
    assert attributor.state_dict() == state  # nothing drawn
