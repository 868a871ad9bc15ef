"""Ranking metrics against plain-Python references; pool padding helpers; ESCI gains."""

import math
import random

import pytest
import torch
from conftest import iphone_charger_pool
from hypothesis import given, settings
from hypothesis import strategies as st

from ospo_fast.data import ESCI_GAINS, esci_gain
from ospo_fast.rewards import (
    mrr,
    ndcg_at_k,
    pad_pools,
    pool_metric,
    ranking_metrics,
    recall_at_k,
)

# ---------------------------------------------------------------------------------------------------------
# plain-Python references: one row at a time, explicit sort


def ref_order(scores, valid):
    """Valid pool positions, best first; NaN lowest; ties by pool position."""
    key = lambda i: (-(scores[i] if not math.isnan(scores[i]) else -math.inf), i)  # noqa: E731
    return sorted((i for i in range(len(scores)) if valid[i]), key=key)


def ref_ndcg(scores, gains, valid, k=None, exponential=False):
    g = (lambda x: 2.0**x - 1.0) if exponential else (lambda x: x)
    order = ref_order(scores, valid)
    kk = len(order) if k is None else k
    dcg = sum(g(gains[i]) / math.log2(r + 2) for r, i in enumerate(order[:kk]))
    ideal = sorted((gains[i] for i in range(len(gains)) if valid[i]), reverse=True)
    idcg = sum(g(x) / math.log2(r + 2) for r, x in enumerate(ideal[:kk]))
    return dcg / idcg if idcg > 0 else 0.0


def ref_recall(scores, gains, valid, k=None, threshold=0.0):
    order = ref_order(scores, valid)
    kk = len(order) if k is None else k
    rel = {i for i in order if gains[i] > threshold}
    if not rel:
        return 0.0
    return len(rel & set(order[:kk])) / len(rel)


def ref_mrr(scores, gains, valid, k=None, threshold=0.0):
    order = ref_order(scores, valid)
    kk = len(order) if k is None else k
    for r, i in enumerate(order[:kk]):
        if gains[i] > threshold:
            return 1.0 / (r + 1)
    return 0.0


def random_batch(n, p, seed, tie_levels=5, dtype=torch.float64):
    """Scores with many ties, graded gains with zeros, and a ragged valid mask (some rows fully padded)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, tie_levels, (n, p), generator=g).to(dtype) / tie_levels
    scores += torch.rand(n, p, generator=g, dtype=dtype) * (torch.rand(n, p, generator=g) < 0.5)
    levels = torch.tensor([0.0, 0.0, 0.01, 0.1, 1.0, 3.0], dtype=dtype)
    gains = levels[torch.randint(0, len(levels), (n, p), generator=g)]
    lengths = torch.randint(0, p + 1, (n,), generator=g)
    valid = torch.arange(p)[None, :] < lengths[:, None]
    # shuffle the valid mask of some rows so padding is not always at the end
    for r in range(0, n, 3):
        valid[r] = valid[r][torch.randperm(p, generator=g)]
    return scores, gains, valid


def rows(*tensors):
    return zip(*(t.tolist() for t in tensors))


def assert_rows(got, want, tol=1e-6):
    assert got.shape == (len(want),)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=tol, rtol=0)


KS = [None, 1, 2, 3, 5, 8, 13, 40]


# ---------------------------------------------------------------------------------------------------------
# metric values


@pytest.mark.parametrize("k", KS)
def test_ndcg_matches_python_reference_on_ragged_pools(k):
    seed = random.randrange(2**31)
    scores, gains, valid = random_batch(7, 13, seed)
    got = ndcg_at_k(scores, gains, k=k, valid=valid)
    assert_rows(got, [ref_ndcg(s, g, v, k) for s, g, v in rows(scores, gains, valid)])


@pytest.mark.parametrize("k", KS)
def test_exponential_gain_ndcg_matches_python_reference(k):
    scores, gains, valid = random_batch(9, 11, random.randrange(2**31))
    got = ndcg_at_k(scores, gains, k=k, valid=valid, gain="exponential")
    assert_rows(got, [ref_ndcg(s, g, v, k, exponential=True) for s, g, v in rows(scores, gains, valid)])


@pytest.mark.parametrize("k", KS)
def test_recall_matches_python_reference_on_ragged_pools(k):
    scores, gains, valid = random_batch(7, 13, random.randrange(2**31))
    got = recall_at_k(scores, gains, k=k, valid=valid)
    assert_rows(got, [ref_recall(s, g, v, k) for s, g, v in rows(scores, gains, valid)])


@pytest.mark.parametrize("k", KS)
def test_mrr_matches_python_reference_on_ragged_pools(k):
    scores, gains, valid = random_batch(7, 13, random.randrange(2**31))
    got = mrr(scores, gains, k=k, valid=valid)
    assert_rows(got, [ref_mrr(s, g, v, k) for s, g, v in rows(scores, gains, valid)])


def test_threshold_defines_relevance_for_recall_and_mrr():
    scores, gains, valid = random_batch(5, 17, random.randrange(2**31))
    assert_rows(
        recall_at_k(scores, gains, k=4, valid=valid, threshold=0.05),
        [ref_recall(s, g, v, 4, 0.05) for s, g, v in rows(scores, gains, valid)],
    )
    assert_rows(
        mrr(scores, gains, k=6, valid=valid, threshold=0.5),
        [ref_mrr(s, g, v, 6, 0.5) for s, g, v in rows(scores, gains, valid)],
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    p=st.integers(1, 9),
    k=st.one_of(st.none(), st.integers(1, 12)),
    data=st.data(),
)
def test_all_metrics_match_python_reference_property(n, p, k, data):
    floats = st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.5, -math.inf, math.inf, math.nan])

    def matrix(elements):
        return data.draw(st.lists(st.lists(elements, min_size=p, max_size=p), min_size=n, max_size=n))

    gains = torch.tensor(matrix(st.sampled_from([0.0, 0.01, 0.1, 1.0])), dtype=torch.float64)
    valid = torch.tensor(matrix(st.booleans()))
    scores = torch.tensor(matrix(floats))
    r = list(rows(scores, gains, valid))
    assert_rows(ndcg_at_k(scores, gains, k, valid), [ref_ndcg(s, g, v, k) for s, g, v in r])
    assert_rows(recall_at_k(scores, gains, k, valid), [ref_recall(s, g, v, k) for s, g, v in r])
    assert_rows(mrr(scores, gains, k, valid), [ref_mrr(s, g, v, k) for s, g, v in r])


def test_ranking_metrics_equal_the_single_metrics():
    scores, gains, valid = random_batch(7, 23, random.randrange(2**31))
    out = ranking_metrics(scores, gains, ks=(3, 10, None), valid=valid)
    assert set(out) == {f"{m}{s}" for m in ("ndcg", "recall", "mrr") for s in ("@3", "@10", "")}
    for k, s in ((3, "@3"), (10, "@10"), (None, "")):
        torch.testing.assert_close(out[f"ndcg{s}"], ndcg_at_k(scores, gains, k, valid))
        torch.testing.assert_close(out[f"recall{s}"], recall_at_k(scores, gains, k, valid))
        torch.testing.assert_close(out[f"mrr{s}"], mrr(scores, gains, k, valid))


def test_default_ranking_metric_keys():
    out = ranking_metrics(torch.rand(3, 5), torch.rand(3, 5))
    assert list(out) == [f"{m}@{k}" for k in (10, 20, 50, 100) for m in ("ndcg", "recall", "mrr")]


def test_pool_metric_dispatches_by_name():
    scores, gains, valid = random_batch(4, 9, random.randrange(2**31))
    torch.testing.assert_close(pool_metric("ndcg", scores, gains, valid, 5), ndcg_at_k(scores, gains, 5, valid))
    torch.testing.assert_close(pool_metric("recall", scores, gains, valid, 5), recall_at_k(scores, gains, 5, valid))
    torch.testing.assert_close(pool_metric("mrr", scores, gains, valid, 5), mrr(scores, gains, 5, valid))
    with pytest.raises(ValueError, match="metric"):
        pool_metric("map", scores, gains, valid, 5)


# ---------------------------------------------------------------------------------------------------------
# edge cases


def test_perfect_ranking_gives_ndcg_one():
    g = torch.Generator().manual_seed(random.randrange(2**31))
    gains = torch.rand(5, 19, generator=g) * (torch.rand(5, 19, generator=g) < 0.6)
    gains[:, 0] = 0.7  # at least one positive gain per row
    for k in (None, 1, 4, 19):
        torch.testing.assert_close(ndcg_at_k(gains.clone(), gains, k=k), torch.ones(5))


def test_zero_gain_row_gives_zero_not_nan():
    scores = torch.rand(3, 7)
    gains = torch.zeros(3, 7)
    gains[1, 2] = 1.0
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[2] = False  # a fully padded row
    for fn in (ndcg_at_k, recall_at_k, mrr):
        out = fn(scores, gains, k=3, valid=valid)
        assert not torch.isnan(out).any()
        assert out[0] == 0 and out[2] == 0


def test_padding_is_never_ranked_or_counted():
    n, p = 6, 11
    g = torch.Generator().manual_seed(random.randrange(2**31))
    scores = torch.rand(n, p, generator=g, dtype=torch.float64)
    gains = torch.rand(n, p, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, p + 1, (n,), generator=g)
    valid = torch.arange(p)[None] < lengths[:, None]
    # Padding with the best scores and the largest gains must change nothing.
    noisy_scores = torch.where(valid, scores, torch.full_like(scores, 1e9))
    noisy_gains = torch.where(valid, gains, torch.full_like(gains, 1e3))
    for k in (None, 1, 3, 7):
        for fn in (ndcg_at_k, recall_at_k, mrr):
            got = fn(noisy_scores, noisy_gains, k=k, valid=valid)
            compact = [fn(scores[r : r + 1, : lengths[r]], gains[r : r + 1, : lengths[r]], k=k)[0] for r in range(n)]
            torch.testing.assert_close(got, torch.stack(compact))


def test_ties_are_broken_by_pool_position():
    gains = torch.tensor([[0.0, 1.0, 0.0, 0.1], [1.0, 0.0, 0.0, 0.0]])
    scores = torch.zeros(2, 4)  # every entry tied: ranked in pool order
    want0 = (1 / math.log2(3) + 0.1 / math.log2(5)) / (1 + 0.1 / math.log2(3))
    torch.testing.assert_close(ndcg_at_k(scores, gains), torch.tensor([want0, 1.0]))
    torch.testing.assert_close(mrr(scores, gains), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(recall_at_k(scores, gains, k=1), torch.tensor([0.0, 1.0]))


def test_output_dtype_follows_inputs():
    s32, g32 = torch.rand(2, 5), torch.rand(2, 5)
    assert ndcg_at_k(s32, g32).dtype == torch.float32
    assert ndcg_at_k(s32.double(), g32).dtype == torch.float64
    assert recall_at_k(s32.half(), g32, k=2).dtype == torch.float32


def test_metric_argument_errors_name_the_argument():
    s = torch.rand(2, 5)
    with pytest.raises(ValueError, match="gains"):
        ndcg_at_k(s, torch.rand(2, 4))
    with pytest.raises(ValueError, match="valid"):
        ndcg_at_k(s, torch.rand(2, 5), valid=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores"):
        ndcg_at_k(torch.rand(5), torch.rand(5))
    with pytest.raises(ValueError, match="k"):
        mrr(s, torch.rand(2, 5), k=0)
    with pytest.raises(ValueError, match="gain"):
        ndcg_at_k(s, torch.rand(2, 5), gain="log")


# ---------------------------------------------------------------------------------------------------------
# real graded pool: the iphone-charger query with 99 judged ESCI products


@pytest.fixture(scope="module")
def iphone_pool():
    texts, labels = iphone_charger_pool()
    return [t for t in texts], [esci_gain(label) for label in labels]


def test_esci_real_pool_metrics_match_reference_with_random_scores(iphone_pool):
    _, gains = iphone_pool
    n, p = 5, len(gains)
    scores = torch.rand(n, p, dtype=torch.float64)
    g = torch.tensor([gains] * n, dtype=torch.float64)
    valid = torch.ones(n, p, dtype=torch.bool)
    valid[1, 60:] = False
    valid[3, ::2] = False
    r = list(rows(scores, g, valid))
    for k in (10, 20, 50, 100):
        assert_rows(ndcg_at_k(scores, g, k, valid), [ref_ndcg(*x, k) for x in r])
        assert_rows(recall_at_k(scores, g, k, valid), [ref_recall(*x, k) for x in r])
        assert_rows(mrr(scores, g, k, valid), [ref_mrr(*x, k) for x in r])


def test_esci_real_pool_metrics_match_reference_with_word_overlap_scores(iphone_pool):
    texts, gains = iphone_pool
    queries = ["iphone charger", "usb c fast charging cable", "wireless charging pad", "banana"]

    def overlap(q, t):  # few distinct values: many ties
        return float(len(set(q.lower().split()) & set(t.lower().split())))

    scores = torch.tensor([[overlap(q, t) for t in texts] for q in queries], dtype=torch.float64)
    g = torch.tensor([gains] * len(queries), dtype=torch.float64)
    valid = torch.ones_like(g, dtype=torch.bool)
    r = list(rows(scores, g, valid))
    for k in (None, 10, 20):
        assert_rows(ndcg_at_k(scores, g, k), [ref_ndcg(*x, k) for x in r])
        assert_rows(recall_at_k(scores, g, k), [ref_recall(*x, k) for x in r])
        assert_rows(mrr(scores, g, k), [ref_mrr(*x, k) for x in r])


def test_esci_labels_map_to_paper_gains():
    assert ESCI_GAINS == {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
    for word, letter in (("Exact", "E"), ("substitute", "S"), (" COMPLEMENT ", "C"), ("Irrelevant", "I")):
        assert esci_gain(word) == ESCI_GAINS[letter] == esci_gain(letter.lower())
    for bad in ("X", "", "exactly", 1):
        with pytest.raises(ValueError, match="label"):
            esci_gain(bad)


def test_esci_gain_lives_in_the_data():
    assert esci_gain.__module__ == "ospo_fast.data.gains"


# ---------------------------------------------------------------------------------------------------------
# pad_pools


def test_pad_pools_pads_ragged_pools_left_aligned():
    pools = [[4, 0, 2], [1], [3, 3, 0, 1, 2]]
    gains = [[1.0, 0.0, 0.1], [0.01], [0, 1, 0, 0.1, 1]]
    index, g, valid = pad_pools(pools, gains, num_items=5)
    assert index.dtype == torch.long and g.dtype == torch.float32 and valid.dtype == torch.bool
    assert index.shape == g.shape == valid.shape == (3, 5)
    for o, (pool, gain) in enumerate(zip(pools, gains)):
        n = len(pool)
        assert index[o, :n].tolist() == pool
        torch.testing.assert_close(g[o, :n], torch.tensor(gain, dtype=torch.float32))
        assert valid[o, :n].all() and not valid[o, n:].any()
        assert (g[o, n:] == 0).all() and (index[o, n:] == 0).all()


def test_pad_pools_accepts_tensors_and_arrays():
    import numpy as np

    idx = np.array([[0, 2, 1], [2, 2, 0]])
    gains = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.1, 1.0]])
    index, g, valid = pad_pools(idx, gains, num_items=3)
    assert index.tolist() == idx.tolist() and valid.all()
    index2, g2, _ = pad_pools([torch.tensor([1, 0]), np.array([2])], [np.array([0.5, 1.0]), [1.0]], num_items=3)
    assert index2.tolist() == [[1, 0], [2, 0]] and g2.tolist() == [[0.5, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize(
    "pools, gains, arg",
    [
        ([], [], "pools"),
        ([[0, 1], []], [[1.0, 0.0], []], r"pools\[1\]"),
        ([[0, 1]], [[1.0, 0.0], [1.0]], "gains"),
        ([[0, 1], [2]], [[1.0, 0.0]], "gains"),
        ([[0, 1, 2]], [[1.0, 0.0]], r"gains\[0\]"),
        ([[0, 1], [2]], [[1.0, 0.0], [float("nan")]], r"gains\[1\]"),
        ([[0, 1]], [[float("inf"), 0.0]], r"gains\[0\]"),
        ([[0, 1]], [[1.0, -0.1]], r"gains\[0\]"),
        ([[0, -1]], [[1.0, 0.0]], r"pools\[0\]"),
        ([[0, 1], [7]], [[1.0, 0.0], [1.0]], r"pools\[1\]"),
        ([[0, 1.5]], [[1.0, 0.0]], "pools"),
        ([[0, 1]], [["E", "I"]], "gains"),
        ("abc", [[1.0]], "pools"),
    ],
)
def test_pad_pools_rejects_bad_input_naming_the_argument(pools, gains, arg):
    with pytest.raises(ValueError, match=arg):
        pad_pools(pools, gains, num_items=5)


def test_pad_pools_places_tensors_on_the_requested_device():
    index, g, valid = pad_pools([[0, 1]], [[1.0, 0.0]], "cpu")
    assert index.device.type == g.device.type == valid.device.type == "cpu"


@pytest.mark.gpu
def test_metrics_on_cuda_match_cpu_without_host_sync():
    scores, gains, valid = random_batch(33, 101, random.randrange(2**31), dtype=torch.float32)
    want = ranking_metrics(scores, gains, ks=(5, 10, None), valid=valid)
    s, g, v = scores.cuda(), gains.cuda(), valid.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ranking_metrics(s, g, ks=(5, 10, None), valid=v)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for key in want:
        torch.testing.assert_close(got[key].cpu(), want[key])


@pytest.mark.parametrize(
    "gains, message",
    [
        ([[3e38, 3e38, 0.0]],
         r"gains\[0\]: the pool's gains sum to 6e\+38, beyond what the metrics can sum in torch.float32"),
        ([[1.0, 0.0, 0.0], [2e38, 2e38, 1.0]], r"gains\[1\]: the pool's gains sum"),
        ([[1.0, 1e-50, 0.0]], r"gains\[0\]: gain 1e-50 rounds to 0 in torch.float32"),
    ],
)
def test_gains_the_float32_metrics_cannot_hold_are_refused(gains, message):
    # Each gain is finite in float64 (and 3e38 even in float32), but the first pool's NDCG sums overflow to
    # inf / inf = NaN in float32 and a gain of 1e-50 becomes 0 there (no longer relevant).
    with pytest.raises(ValueError, match=message):
        pad_pools([[0, 1, 2]] * len(gains), gains)


def test_largest_accepted_gains_give_finite_metrics():
    limit = torch.finfo(torch.float32).max / 2
    index, gains, valid = pad_pools([[0, 1, 2]], [[limit / 2, limit / 4, limit / 4]])
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    for metric in ("ndcg", "recall", "mrr"):
        value = pool_metric(metric, scores, gains, valid)
        assert torch.isfinite(value).all() and 0 < float(value) <= 1, (metric, value)
