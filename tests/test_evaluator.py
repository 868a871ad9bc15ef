"""EncoderCoalitionEvaluator: the host layout (the tokens of players and of the text between them, distinct
sequences, chunks) and the packed values against the reward of each coalition text."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_close, iphone_charger_pool
from evaluation_inputs import (
    WORDS,
    coalition_batch,
    dense_reward,
    punctuated_response,
    random_response,
    words_between_players,
)

import ospo_fast as of
from ospo_fast import _extension
from ospo_fast.evaluate import (
    CoalitionBatch,
    EncoderCoalitionEvaluator,
    evaluate_text_reward,
    pack_coalitions,
    packed_support,
)
from ospo_fast.structure import MAX_PLAYERS


@pytest.fixture(scope="module")
def reward():
    """On the CPU even where a GPU is present: the float32 path compares to fp32 tolerance (on CUDA the packed
    forward defaults to bf16; a GPU test builds its own reward)."""
    return dense_reward()


def test_packed_forward_matches_per_coalition_loop_through_unmodified_model(reward):
    rng = random.Random(0)
    texts = [random_response(rng) for _ in range(7)]
    coalitions = coalition_batch(texts, [rng.randrange(2) for _ in texts])
    embeddings, seq_index = EncoderCoalitionEvaluator(reward).embed(coalitions)
    got = embeddings[torch.from_numpy(seq_index)]
    unique, coalition = coalitions.value_rows()
    coalition_texts = [of.coalition_texts(coalitions.segmentations[u], coalitions.plans[u].masks)
                       for u in range(len(coalitions.plans))]
    expected = torch.stack([reward.encoder.encode([coalition_texts[u][c]])[0] for u, c in zip(unique, coalition)])
    assert_close(got, expected, rtol=1e-5, atol=2e-5, what="packed embeddings")


def test_layout_tokenises_only_the_answer_once_and_a_think_block_changes_no_value(reward):
    answer = "usb c cable for car, 2 pack. apple certified"
    thinking = "<think>" + " ".join(["the user wants a charger that is fast and small"] * 20) + "</think>"
    coalitions = coalition_batch([f"{thinking}<answer>{answer}</answer>", answer], [0, 0], method="exact")
    evaluator = EncoderCoalitionEvaluator(reward)
    layout = evaluator.layout(coalitions)
    tokenizer = reward.encoder.tokenizer
    sg = coalitions.segmentations[1]
    answer_tokens = len(tokenizer(sg.text[sg.spans[0][0] : sg.spans[-1][1]], add_special_tokens=False)["input_ids"])
    assert layout.text_offsets.tolist() == [0, answer_tokens, 2 * answer_tokens]  # no token of the think block
    values = coalitions.batch.split_values(evaluator.values(layout))
    assert_close(values[0], values[1], rtol=0, atol=1e-6, what="values with and without the think block")
    again = evaluator.layout(coalitions)  # every phrase's tokens now come from the evaluator's cache
    for name in ("token_ids", "token_need", "lengths", "seq_keep", "value_sequence"):
        assert np.array_equal(getattr(again, name), getattr(layout, name)), name


def _needs_in_context(sg, offsets) -> list[int]:
    """The need of each token of the whole response, by definition: a token inside player i needs bit i, one
    between players i and i + 1 needs both, one before the first player or after the last is never kept (0).
    As Python ints, bit 63 included; compared with the int64 layout modulo 2**64."""
    needs = []
    for (s, e), p in zip(offsets, of.token_player_map(sg, offsets).tolist()):
        if p >= 0:
            needs.append(1 << p)
            continue
        after = [i for i, (ps, _) in enumerate(sg.spans) if ps >= e]  # the players after the token
        inside = 0 < len(after) < sg.num_players and s < e
        needs.append(3 << (after[0] - 1) if inside else 0)
    return needs


def test_players_and_gaps_tokenised_alone_get_their_tokens_in_the_whole_response(reward):
    # The layout tokenises each player and each gap between players on its own; that equals their tokens in
    # the response because players start and end where the encoder's pre-tokenizer splits. Checked on messy
    # random answers, real product texts, and hand-cut segmentations with words between the players.
    rng = random.Random(13)
    extra = ["t-shirt", "men's", "3.5", "1,000", "$20", "(2 pack)", "e.g.", "usb-c/lightning", "naïve", "café;", "x2!",
             "中文字", "a—b", "wait…", "•item", "ＡＢＣ", "😀ok", "Ünïcödé", "50%", "#1", "a_b", "q&a"]
    texts = [random_response(rng) + " " + " ".join(rng.sample(extra, 3)) + rng.choice([".", ", and", "?"])
             for _ in range(40)]
    texts += [punctuated_response(rng) for _ in range(20)] + [t[:300] for t in iphone_charger_pool()[0][:40]]
    segmentations = [of.Segmenter(max_players=rng.choice([5, 9, MAX_PLAYERS]))(t) for t in texts]
    segmentations += [words_between_players(rng) for _ in range(25)]
    plans = [of.make_plan(sg.structure, "sampled", budget=4, seed=0) for sg in segmentations]
    coalitions = CoalitionBatch.build(segmentations, plans, [0] * len(segmentations))
    layout = EncoderCoalitionEvaluator(reward).layout(coalitions)
    tokenizer = reward.encoder.tokenizer
    for u, sg in enumerate(coalitions.segmentations):
        whole = tokenizer(sg.text, add_special_tokens=False, return_offsets_mapping=True)
        needs = _needs_in_context(sg, whole["offset_mapping"])
        expected = [(t, need) for t, need in zip(whole["input_ids"], needs) if need]
        lo, hi = layout.text_offsets[u], layout.text_offsets[u + 1]
        got = [(t, need % (1 << 64))
               for t, need in zip(layout.token_ids[lo:hi].tolist(), layout.token_need[lo:hi].tolist())]
        assert got == expected, sg.text


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_player_at_bit_63_and_the_gap_before_it_are_kept_by_their_coalitions(reward, backend):
    """64 players: player 63's tokens need the sign bit of the int64 masks, the gap before it bits 62 and 63;
    each packed sequence is the encoder's tokens of its coalition text, and the layout's lengths count them."""
    if backend == "triton" and not _extension.has_triton():
        pytest.skip("triton is not installed")
    text = ", ".join(f"w{i}" for i in range(MAX_PLAYERS - 1)) + ". last & final word"
    sg = of.Segmenter(max_players=MAX_PLAYERS)(text)
    assert sg.num_players == MAX_PLAYERS and sg.segments[-1] == "final word"
    assert sg.text[sg.spans[-2][1] : sg.spans[-1][0]] == " & "
    masks = torch.ones(6, MAX_PLAYERS, dtype=torch.bool)
    masks[1, 62] = masks[2, 63] = masks[3, :62] = masks[4, 1::2] = masks[5, :] = False
    masks[5, 63] = True
    coalitions = CoalitionBatch.build([sg], [of.make_plan(sg.structure, "sampled", budget=2, seed=3)], [0])
    evaluator = EncoderCoalitionEvaluator(reward)
    layout = evaluator.layout(coalitions)
    tokenizer = reward.encoder.tokenizer
    plan_lengths = [min(len(tokenizer(t)["input_ids"]), evaluator.max_length)  # the encoder truncates
                    for t in of.coalition_texts(sg, coalitions.plans[0].masks)]
    assert layout.lengths[layout.value_sequence].tolist() == plan_lengths
    texts = of.coalition_texts(sg, masks)
    expected = [tokenizer(t)["input_ids"] for t in texts]
    keys = np.array([sum(1 << i for i, keep in enumerate(m) if keep) for m in masks.tolist()], dtype=np.uint64)
    cu = np.concatenate([[0], np.cumsum([len(e) for e in expected])])
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    args = [torch.from_numpy(a).to(device) for a in (layout.token_ids, layout.token_need, layout.text_offsets)]
    out = pack_coalitions(
        *args, torch.zeros(len(texts), dtype=torch.long, device=device),
        torch.from_numpy(keys.view(np.int64)).to(device),
        torch.from_numpy(cu).to(device), evaluator.cls_id, evaluator.sep_id, int(cu[-1]), layout.max_text_tokens,
        backend=backend,
    ).cpu()
    assert keys.view(np.int64)[0] == -1 and layout.token_need.min() < 0  # the sign bit is in use
    for c, text in enumerate(texts):
        assert out[cu[c] : cu[c + 1]].tolist() == expected[c], text


@pytest.mark.parametrize("collide", [False, True])
def test_coalitions_with_the_same_text_share_one_sequence(reward, monkeypatch, collide):
    import ospo_fast.evaluate.evaluator as evaluate

    if collide:  # every row gets the same key: the exact check must catch it and compare whole rows
        monkeypatch.setattr(evaluate, "_ROW_KEY_MULTIPLIERS", np.zeros_like(evaluate._ROW_KEY_MULTIPLIERS))
    texts = ["usb c cable for car. black", "usb c cable with magsafe. black", "usb c cable for car. black, 2 pack"]
    coalitions = coalition_batch(texts, [0, 1, 0], method="exact")
    contents = {text for sg, plan in zip(coalitions.segmentations, coalitions.plans)
                for text in of.coalition_texts(sg, plan.masks)}
    evaluator = EncoderCoalitionEvaluator(reward)
    layout = evaluator.layout(coalitions)
    assert layout.num_sequences == len(contents) < coalitions.batch.num_values
    text_values, _ = evaluate_text_reward(reward, coalitions)  # one reward call per distinct coalition text
    assert_close(evaluator.values(layout), text_values, rtol=1e-5, atol=1e-5, what="values with shared sequences")


def test_phrase_token_cache_starts_over_when_full_and_changes_no_layout(reward, monkeypatch):
    import ospo_fast.evaluate.evaluator as evaluate

    monkeypatch.setattr(evaluate, "_PHRASE_CACHE_SIZE", 6)
    rng = random.Random(12)
    texts = [random_response(rng) for _ in range(7)]
    evaluator = EncoderCoalitionEvaluator(reward)
    for start in (0, 2, 4):  # each batch has more phrases than the cache holds, and a text of the one before
        coalitions = coalition_batch(texts[start : start + 3], [0, 1, 0])
        got, fresh = evaluator.layout(coalitions), EncoderCoalitionEvaluator(reward).layout(coalitions)
        assert np.array_equal(got.token_ids, fresh.token_ids) and np.array_equal(got.token_need, fresh.token_need)


def test_packed_values_equal_the_reward_of_each_coalition_text(reward):
    """Every coalition (exact plans) of answers with punctuation, symbols and words between their players:
    its packed embedding is the encoder's embedding of its coalition text, and its value that text's reward."""
    rng = random.Random(1)
    seg = of.Segmenter(max_players=5)
    answers = [random_response(rng) for _ in range(3)] + [punctuated_response(rng) for _ in range(6)]
    answers += [t[:200] for t in rng.sample(iphone_charger_pool()[0], 3)]
    segmentations = [seg(t) for t in answers] + [words_between_players(rng) for _ in range(3)]
    plans = [of.make_plan(sg.structure, "exact") for sg in segmentations]
    coalitions = CoalitionBatch.build(segmentations, plans, [rng.randrange(2) for _ in segmentations])
    evaluator = EncoderCoalitionEvaluator(reward)
    layout = evaluator.layout(coalitions)
    text_values, _ = evaluate_text_reward(reward, coalitions)
    assert_close(evaluator.values(layout), text_values, rtol=1e-5, atol=1e-5, what="coalition values")
    texts_u = [of.coalition_texts(sg, plan.masks) for sg, plan in zip(coalitions.segmentations, coalitions.plans)]
    unique, coalition = coalitions.value_rows()
    texts = sorted({texts_u[u][c] for u, c in zip(unique.tolist(), coalition.tolist())})
    assert any(", " in t for t in texts) and any(" for " in t for t in texts) and len(texts) > 300
    expected = dict(zip(texts, reward.encoder.encode(texts)))
    embeddings = evaluator.embed_layout(layout)[torch.from_numpy(layout.value_sequence)]
    for k, (u, c) in enumerate(zip(unique.tolist(), coalition.tolist())):
        assert_close(embeddings[k], expected[texts_u[u][c]], rtol=1e-5, atol=2e-5, what=repr(texts_u[u][c]))
    # The grand coalition is the answer as written, punctuation and all.
    answers = [sg.text[sg.spans[0][0] : sg.spans[-1][1]] for sg in segmentations]
    full = coalitions.batch.value_offsets[:-1] + np.array([p.full_index for p in plans])
    assert_close(embeddings[full], reward.encoder.encode(answers), rtol=1e-5, atol=2e-5, what="the whole answers")


def test_same_phrases_with_other_text_between_them_are_other_sequences(reward):
    """Coalitions share a sequence only when their texts agree: the same phrases with other punctuation
    between them are embedded apart, and their values are the rewards of their own texts."""
    texts = ["usb c cable, black & white. for car", "usb c cable. black & white, for car",
             "usb c cable: black + white (for car"]
    coalitions = coalition_batch(texts, [0, 0, 0], method="exact")
    assert len({sg.segments for sg in coalitions.segmentations}) == 1
    evaluator = EncoderCoalitionEvaluator(reward)
    embeddings, sequence = evaluator.embed(coalitions)
    full = coalitions.batch.value_offsets[:-1] + np.array([p.full_index for p in coalitions.plans])
    assert len(set(sequence[full].tolist())) == 3
    assert_close(embeddings[torch.from_numpy(sequence[full])], reward.encoder.encode(texts), rtol=1e-5, atol=2e-5,
                 what="embeddings of the whole answers")
    packed, _ = evaluator(coalitions)
    text_values, _ = evaluate_text_reward(reward, coalitions)
    assert_close(packed, text_values, rtol=1e-5, atol=1e-5, what="values")
    assert len(set(text_values[full].tolist())) > 1  # the reward tells the separators apart


def test_packed_path_truncates_like_the_encoder(reward):
    long_answer = ". ".join(" ".join(random.Random(s).choice(WORDS) for _ in range(40)) for s in range(5))
    coalitions = coalition_batch([long_answer], [0], method="sampled")
    packed, _ = EncoderCoalitionEvaluator(reward)(coalitions)
    text_values, _ = evaluate_text_reward(reward, coalitions)
    assert_close(packed, text_values, rtol=1e-5, atol=1e-5, what="truncated coalition values")


def test_empty_coalition_is_embedded_once_for_the_batch(reward):
    rng = random.Random(5)
    texts = [random_response(rng) for _ in range(6)]
    coalitions = coalition_batch(texts, [0] * 6, method="exact")
    _, seq_index = EncoderCoalitionEvaluator(reward).embed(coalitions)
    starts = coalitions.batch.value_offsets[:-1]  # each plan's coalition 0 is the empty one
    assert set(seq_index[starts].tolist()) == {0}


def test_chunked_forwards_give_the_values_of_one_forward(reward):
    """``chunk_tokens`` splits a batch into several forwards (memory); the ranges cover every sequence in
    order, each within the bound unless one sequence alone exceeds it, and the values do not change."""
    from ospo_fast.evaluate.layout import _chunks

    rng = random.Random(14)
    coalitions = coalition_batch([random_response(rng) for _ in range(4)], [0, 1, 0, 1])
    whole = EncoderCoalitionEvaluator(reward)
    layout = whole.layout(coalitions)
    for bound in (1, 7, 40, int(layout.lengths.sum()) - 1):
        chunks = _chunks(layout.lengths, bound)
        assert chunks[0][0] == 0 and chunks[-1][1] == layout.num_sequences and len(chunks) > 1
        assert all(hi == lo for (_, hi), (lo, _) in zip(chunks, chunks[1:]))
        assert all(hi - lo == 1 or layout.lengths[lo:hi].sum() <= bound for lo, hi in chunks)
    assert _chunks(layout.lengths, int(layout.lengths.sum())) == [(0, layout.num_sequences)]
    assert _chunks(layout.lengths[:0], 10) == []
    chunked = EncoderCoalitionEvaluator(reward, chunk_tokens=40)
    assert_close(chunked.values(chunked.layout(coalitions)), whole.values(layout), rtol=1e-5, atol=1e-6,
                 what="chunked values")


@pytest.mark.gpu
def test_packed_values_on_cuda_need_no_host_sync_and_match_the_cpu(reward):
    """The device half of a packed evaluation (pack, bf16 forward with varlen attention, pool, score) runs
    with no stream synchronisation and gives the fp32 CPU values to bf16 tolerance."""
    rng = random.Random(21)
    texts = [random_response(rng) for _ in range(9)]
    coalitions = coalition_batch(texts, [rng.randrange(2) for _ in texts])
    expected, _ = EncoderCoalitionEvaluator(reward)(coalitions)
    evaluator = EncoderCoalitionEvaluator(dense_reward("cuda"))
    layout = evaluator.layout(coalitions)
    evaluator.values(layout)  # warm-up: Triton compiles, cuBLAS initialises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = evaluator.values(layout)
        phi = of.owen_from_values(coalitions.batch, got)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.is_cuda and phi.is_cuda
    # NDCG of rankings from bf16 embeddings: a near-tie may swap, so compare in bulk and bound the worst case.
    diff = (got.cpu() - expected.cpu()).abs()
    assert float(diff.median()) < 1e-3 and float(diff.max()) < 0.1, (float(diff.median()), float(diff.max()))


def test_packed_support_accepts_a_dense_reward_over_a_bert_encoder(reward):
    assert packed_support(reward) is None


def _with_encoder(reward, **changes):
    """An encoder reward like ``reward`` whose encoder (or its model's config) differs by ``changes``."""
    encoder = reward.encoder
    config = dict(vars(encoder.model.config), **changes.pop("config", {}))
    model = SimpleNamespace(config=SimpleNamespace(**config))
    fields = dict(tokenizer=encoder.tokenizer, model=model, max_length=encoder.max_length, dim=encoder.dim,
                  pooling=encoder.pooling)
    fields.update(changes)
    return SimpleNamespace(encoder=SimpleNamespace(**fields), device=reward.device,
                           score_embeddings=reward.score_embeddings)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(pooling="max"), "reward.encoder.pooling: the packed path supports 'mean' and 'cls', got 'max'"),
        (dict(config=dict(model_type="roberta")),
         "reward.encoder.model: the packed forward supports ('bert',), got 'roberta'"),
        (dict(config=dict(position_embedding_type="relative_key")),
         "reward.encoder.model: the packed forward needs absolute position embeddings"),
        (dict(config=dict(hidden_act="swish")),
         "reward.encoder.model: hidden_act 'swish' is not supported by the packed forward"),
    ],
)
def test_packed_support_names_what_the_packed_forward_cannot_run(reward, changes, message):
    unsupported = _with_encoder(reward, **changes)
    assert packed_support(unsupported) == message
    with pytest.raises(ValueError, match=re.escape(message)):
        EncoderCoalitionEvaluator(unsupported)


def test_packed_support_refuses_a_text_reward_and_an_encoder_without_a_transformer():
    def text_reward(texts, owners):
        return [0.0] * len(texts)

    assert packed_support(text_reward).startswith("reward: expected an encoder reward")
    texts, labels = iphone_charger_pool()
    items = [t[:200] for t in texts[:30]]
    lsa = of.rewards.DenseRetrievalReward(
        items, [list(range(30))], [[of.data.esci_gain(x) for x in labels[:30]]],
        encoder=of.rewards.LSAEncoder(items, dim=8), cache_dir=False,
    )
    assert packed_support(lsa) == ("reward.encoder: expected a Hugging Face transformer encoder (tokenizer, model, "
                                   "max_length, dim), got a LSAEncoder without tokenizer, model, max_length")
    with pytest.raises(ValueError, match="reward: expected an encoder reward"):
        EncoderCoalitionEvaluator(text_reward)
