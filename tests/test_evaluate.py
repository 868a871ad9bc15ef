"""Batched coalition evaluation and the OwenAttributor: fast paths against the plain per-coalition loop."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close, iphone_charger_pool

import ospo_fast as of
from ospo_fast import _extension
from ospo_fast.evaluate import (
    CoalitionBatch,
    EncoderCoalitionEvaluator,
    PackedSequences,
    evaluate_text_reward,
    pack_coalitions,
    pack_coalitions_reference,
    pool_packed,
)
from ospo_fast.structure import MAX_PLAYERS

WORDS = (
    "iphone charger fast usb c cable for car wireless pad apple certified braided cord black white 6 ft "
    "with and or magsafe adapter 20w power delivery lightning portable compact travel wall plug pro max"
).split()


def random_response(rng: random.Random) -> str:
    """A random answer: 1-3 sentences of random shopping words, sometimes after a think block."""
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 3))]
    answer = ". ".join(sentences)
    return (f"<think>{rng.choice(WORDS)} {rng.choice(WORDS)}</think><answer>{answer}</answer>" if rng.random() < 0.5
            else answer)


def punctuated_response(rng: random.Random) -> str:
    """A random answer with punctuation, symbols and spacing between its phrases."""
    seps = [", ", ". ", "; ", " & ", " + ", " (", ") ", " / ", " - ", ": ", "! ", " ", "  ", "\n", ",", " , "]
    out = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    for _ in range(rng.randint(0, 7)):
        out += rng.choice(seps) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    return out + rng.choice(["", ".", "!", " :)"])


def words_between_players(rng: random.Random) -> of.Segmentation:
    """A segmentation cut by hand, with function words ("for", "and", "with or") and punctuation left between
    its players, as a segmenter that keeps only content words could cut it."""
    fillers = [" for ", " and ", ", with or ", " - for the ", ". and ", " of ", "; ", " (for) "]
    text, spans = "<answer>", []
    for i in range(rng.randint(1, 7)):
        if i:
            text += rng.choice(fillers)
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase
    sizes, left = [], len(spans)
    while left:
        sizes.append(rng.randint(1, left))
        left -= sizes[-1]
    return of.Segmentation(text + ".</answer>", tuple(spans), of.CoalitionStructure.from_sizes(sizes))


def _reward(device="cpu"):
    texts, labels = iphone_charger_pool()
    return of.rewards.DenseRetrievalReward(
        items=[t[:300] for t in texts[:60]],
        pools=[list(range(0, 60)), list(range(10, 47))],
        gains=[[of.rewards.esci_gain(x) for x in labels[:60]], [of.rewards.esci_gain(x) for x in labels[10:47]]],
        cache_dir=False,
        device=device,
    )


@pytest.fixture(scope="module")
def reward():
    """On the CPU even where a GPU is present: the tests of the float32 path compare to fp32 tolerance (on
    CUDA the packed forward defaults to bf16; the GPU test below builds its own reward)."""
    return _reward()


def _batch(texts, owners, method="auto", budget=40):
    seg = of.Segmenter(max_players=6)
    sgs = [seg(t) for t in texts]
    plans = [of.make_plan(sg.structure, method, budget=budget, seed=1) for sg in sgs]
    return CoalitionBatch.build(sgs, plans, owners)


def test_packed_forward_matches_per_coalition_loop_through_unmodified_model(reward):
    rng = random.Random(0)
    texts = [random_response(rng) for _ in range(7)]
    coalitions = _batch(texts, [rng.randrange(2) for _ in texts])
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
    coalitions = _batch([f"{thinking}<answer>{answer}</answer>", answer], [0, 0], method="exact")
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
    coalitions = _batch(texts, [0, 1, 0], method="exact")
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
        coalitions = _batch(texts[start : start + 3], [0, 1, 0])
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
    coalitions = _batch(texts, [0, 0, 0], method="exact")
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
    coalitions = _batch([long_answer], [0], method="sampled")
    packed, _ = EncoderCoalitionEvaluator(reward)(coalitions)
    text_values, _ = evaluate_text_reward(reward, coalitions)
    assert_close(packed, text_values, rtol=1e-5, atol=1e-5, what="truncated coalition values")


_LOW_AND_HIGH_PLAYERS = list(range(7)) + list(range(MAX_PLAYERS - 7, MAX_PLAYERS))  # bit 63 is the sign bit


def _as_int64(values: list[int]) -> torch.Tensor:
    """Unsigned 64-bit masks (Python ints) as the int64 tensor of the same bits."""
    return torch.from_numpy(np.array(values, dtype=np.uint64).view(np.int64))


def _kept_by_definition(need: int, keep: int) -> bool:
    """A token is kept when it needs some players and all of them are kept (masks as unsigned Python ints)."""
    return need != 0 and keep & need == need


def _random_packing_inputs(seed: int):
    """Texts of players' tokens (one bit) and gap tokens (two adjacent bits), some never kept (0), from players
    near bit 0 and near bit 63; random coalitions (dense, so that gaps are often kept), some truncated."""
    rng = np.random.default_rng(seed)
    num_texts, num_sequences = 5, 23
    lengths = rng.integers(0, 41, size=num_texts)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    total = int(offsets[-1])
    token_ids = torch.from_numpy(rng.integers(1000, 30000, size=total))
    player = rng.choice(_LOW_AND_HIGH_PLAYERS, size=total)
    kind = rng.integers(0, 3, size=total)  # 0: never kept, 1: a player's token, 2: a gap's token
    kind[(player == MAX_PLAYERS - 1) & (kind == 2)] = 1  # the last player has no gap after it
    needs = [0 if k == 0 else (1 << p) | ((1 << (p + 1)) if k == 2 else 0)
             for p, k in zip(player.tolist(), kind.tolist())]
    seq_text = torch.from_numpy(rng.integers(-1, num_texts, size=num_sequences))
    keeps = [sum(1 << b for b in range(MAX_PLAYERS) if rng.random() < 0.8) for _ in range(num_sequences)]
    keeps[:3] = [(1 << 64) - 1, 1 << 63, 0]  # every bit (-1 as int64); the sign bit alone; none
    kept = []
    for s in range(num_sequences):
        u = int(seq_text[s])
        lo, hi = (int(offsets[u]), int(offsets[u + 1])) if u >= 0 else (0, 0)
        kept.append(sum(_kept_by_definition(needs[t], keeps[s]) for t in range(lo, hi)))
    room = rng.integers(0, 12, size=num_sequences)  # truncation of some sequences
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(2 + np.minimum(kept, room))]))
    return dict(token_ids=token_ids, token_need=_as_int64(needs), text_offsets=offsets, seq_text=seq_text,
                seq_keep=_as_int64(keeps), cu_seqlens=cu, cls_id=101, sep_id=102,
                total_tokens=int(cu[-1])), int(lengths.max())


@pytest.mark.skipif(not _extension.has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("seed", range(3))
def test_triton_packing_kernel_matches_reference(seed):
    args, longest = _random_packing_inputs(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    got = pack_coalitions(**dev, max_text_tokens=longest, backend="triton")
    torch.testing.assert_close(got.cpu(), pack_coalitions_reference(**args))


@pytest.mark.parametrize("seed", [7, 8])
def test_packing_reference_keeps_the_coalitions_tokens_in_order(seed):
    args, _ = _random_packing_inputs(seed)
    out = pack_coalitions_reference(**args)
    cu = args["cu_seqlens"]
    needs = [n % (1 << 64) for n in args["token_need"].tolist()]
    gaps_kept = 0
    for s in range(len(cu) - 1):
        seq = out[cu[s] : cu[s + 1]]
        assert seq[0] == 101 and seq[-1] == 102
        u, keep = int(args["seq_text"][s]), int(args["seq_keep"][s]) % (1 << 64)
        if u >= 0:
            lo, hi = int(args["text_offsets"][u]), int(args["text_offsets"][u + 1])
            kept = [t for t in range(lo, hi) if _kept_by_definition(needs[t], keep)]
            gaps_kept += sum(needs[t].bit_count() == 2 for t in kept)
            assert seq[1:-1].tolist() == args["token_ids"][kept][: len(seq) - 2].tolist()
    assert gaps_kept > 0


class CountingReward:
    """A text reward that counts its calls and the texts it scored."""

    def __init__(self):
        self.calls, self.scored = 0, 0

    def __call__(self, texts, owners):
        self.calls += 1
        self.scored += len(texts)
        return torch.tensor([len(set(t.split())) + 0.1 * o for t, o in zip(texts, owners)], dtype=torch.float64)


def test_text_reward_is_called_once_for_the_whole_batch():
    reward = CountingReward()
    rng = random.Random(3)
    out = of.OwenAttributor(reward, method="auto", budget=30)([random_response(rng) for _ in range(11)], [0] * 11)
    assert reward.calls == 1
    assert out.num_evaluations == reward.scored <= out.num_coalitions


def test_duplicate_responses_are_evaluated_once(reward):
    rng = random.Random(4)
    texts = [random_response(rng) for _ in range(3)]
    attr = of.OwenAttributor(reward, method="exact")
    once = attr(texts, [0, 0, 0])
    thrice = attr(texts * 3, [0] * 9)
    assert thrice.num_evaluations == once.num_evaluations
    for a, b in zip(once, thrice[6:]):
        torch.testing.assert_close(a.phi, b.phi)


def test_empty_coalition_is_embedded_once_for_the_batch(reward):
    rng = random.Random(5)
    texts = [random_response(rng) for _ in range(6)]
    coalitions = _batch(texts, [0] * 6, method="exact")
    _, seq_index = EncoderCoalitionEvaluator(reward).embed(coalitions)
    starts = coalitions.batch.value_offsets[:-1]  # each plan's coalition 0 is the empty one
    assert set(seq_index[starts].tolist()) == {0}


@pytest.mark.parametrize("evaluator", ["packed", "text"])
def test_attributor_exact_plan_is_efficient(reward, evaluator):
    rng = random.Random(6)
    out = of.OwenAttributor(reward, method="exact", evaluator=evaluator)([random_response(rng) for _ in range(4)],
                                                                         [1, 0, 1, 0])
    for a in out:
        assert float(a.phi.sum()) == pytest.approx(a.reward - a.baseline, abs=1e-5)


def test_attributor_matches_owen_values_of_the_reward_game(reward):
    text = "fast iphone charger with usb c cable. apple certified, braided cord"
    out = of.OwenAttributor(reward, method="exact")([text], [0])
    sg = out[0].segmentation

    def value_fn(masks):
        return reward(of.coalition_texts(sg, masks), [0] * masks.shape[0]).double()

    assert_close(out[0].phi, of.owen_values(value_fn, sg.structure), rtol=1e-5, atol=1e-5, what="phi")


def test_empty_answer_gives_an_empty_attribution_not_a_crash(reward):
    out = of.OwenAttributor(reward)(["<think>only thinking</think><answer>   </answer>", "usb c cable"], [0, 0])
    assert out[0].phi.numel() == 0 and out[0].segmentation.num_players == 0
    assert out[1].phi.numel() == out[1].segmentation.num_players > 0


def test_attributor_segments_each_distinct_text_once():
    calls = []

    def segmenter(text):
        calls.append(text)
        return of.Segmenter()(text)

    texts = ["usb c cable for car", "fast charger. black", "usb c cable for car", "usb c cable for car"]
    out = of.OwenAttributor(CountingReward(), method="exact", segmenter=segmenter)(texts, [0, 0, 0, 1])
    assert sorted(calls) == sorted(set(texts))
    assert [a.segmentation for a in out] == [of.Segmenter()(t) for t in texts]
    assert_close(out[0].phi, out[2].phi, rtol=0, atol=0, what="phi of a repeated text")


@pytest.mark.parametrize("evaluator", ["packed", "text"])
def test_pipelined_groups_give_the_attributions_of_one_batch(reward, evaluator):
    """``pipeline=k`` attributes the batch in k groups of consecutive responses: the same segmentations,
    plans and values as one group, in order, with a repeated text and an empty answer straddling groups."""
    rng = random.Random(12)
    texts = [random_response(rng) for _ in range(9)]
    texts[6] = texts[1]
    texts[4] = "<think>nothing to say</think><answer> </answer>"
    owners = [rng.randrange(2) for _ in texts]
    whole = of.OwenAttributor(reward, budget=30, seed=4, evaluator=evaluator)(texts, owners)
    for groups in (2, 4, 20):
        out = of.OwenAttributor(reward, budget=30, seed=4, evaluator=evaluator, pipeline=groups)(texts, owners)
        assert [a.text for a in out] == texts and [a.owner for a in out] == owners
        assert out.num_coalitions == whole.num_coalitions and out.num_evaluations >= whole.num_evaluations
        for a, b in zip(out, whole):
            assert a.segmentation == b.segmentation and torch.equal(a.plan.masks, b.plan.masks)
            assert_close(a.values, b.values, rtol=1e-5, atol=1e-6, what=f"values, {groups} groups")
            assert_close(a.phi, b.phi, rtol=1e-5, atol=1e-5, what=f"phi, {groups} groups")
        assert set(out.timings) == {"segment", "plan", "evaluate", "aggregate", "total"}


@pytest.mark.parametrize("pipeline", [0, -1, 1.5, True, "2"])
def test_pipeline_must_be_a_positive_int(reward, pipeline):
    with pytest.raises(ValueError, match=r"pipeline: expected an int >= 1"):
        of.OwenAttributor(reward, pipeline=pipeline)


def test_token_credit_spreads_each_segment_value_over_its_tokens(reward):
    """Attributions.token_credit with a fast tokenizer (the encoder's): every token inside segment i gets
    phi_i / (its token count), every other token (think block, tags, punctuation, padding) 0, and each
    response's credit sums to its Owen values; an empty answer gets no credit."""
    rng = random.Random(15)
    texts = [random_response(rng) for _ in range(5)] + ["<think>hmm</think><answer> </answer>"]
    out = of.OwenAttributor(reward, budget=30, seed=2)(texts, [0, 1, 0, 1, 0, 1])
    tokenizer = reward.encoder.tokenizer
    tc = out.token_credit(tokenizer)
    assert isinstance(tc, of.TokenCredit) and tc.credit.shape == tc.input_ids.shape == tc.token_player.shape
    for j, a in enumerate(out):
        enc = tokenizer(a.text, add_special_tokens=False, return_offsets_mapping=True)
        T = len(enc["input_ids"])
        assert tc.input_ids[j, :T].tolist() == enc["input_ids"] and int(tc.attention_mask[j].sum()) == T
        assert torch.equal(tc.token_player[j, :T], of.token_player_map(a.segmentation, enc["offset_mapping"]))
        for t in range(tc.credit.shape[1]):
            player = int(tc.token_player[j, t])
            expected = 0.0 if player < 0 else float(a.phi[player]) / int((tc.token_player[j] == player).sum())
            assert float(tc.credit[j, t]) == pytest.approx(expected, abs=1e-7)
        assert float(tc.credit[j].sum()) == pytest.approx(float(a.phi.sum()), abs=1e-5)
    assert float(tc.credit[-1].abs().sum()) == 0.0


def test_token_credit_with_a_policy_tokenizer_that_has_no_padding_token():
    """A byte-level BPE fast tokenizer trained here, with no padding token (as many policies' are)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(16)
    texts = [random_response(rng) for _ in range(4)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts * 3,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert tokenizer.pad_token is None
    out = of.OwenAttributor(CountingReward(), budget=20)(texts, [0] * 4)
    tc = out.token_credit(tokenizer)
    for j, a in enumerate(out):
        T = int(tc.attention_mask[j].sum())
        assert tc.input_ids[j, :T].tolist() == tokenizer(a.text)["input_ids"]
        assert float(tc.credit[j].sum()) == pytest.approx(float(a.phi.sum()), abs=1e-9)
        assert float(tc.credit[j, T:].abs().sum()) == 0.0


def test_token_credit_needs_a_fast_tokenizer(reward):
    out = of.OwenAttributor(CountingReward(), method="exact")(["usb c cable for car"], [0])

    class SlowTokenizer:
        def __call__(self, texts, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    with pytest.raises(ValueError, match="tokenizer: expected a Hugging Face fast tokenizer"):
        out.token_credit(SlowTokenizer())


def test_to_html_colours_each_segment_and_escapes_text():
    reward = CountingReward()
    out = of.OwenAttributor(reward, method="exact")(["<answer>red & blue shoes for men</answer>"], [0])
    page = out[0].to_html()
    assert "&lt;answer&gt;" in page and "&amp;" in page and "<answer>" not in page
    assert page.count("Owen value") == out[0].segmentation.num_players


@pytest.mark.parametrize(
    "texts,owners,message",
    [
        ([], [], "texts: expected a non-empty list"),
        ("one text", [0], "texts: expected a list of str"),
        (["a b"], [0, 1], "owners: expected 1 owners (one per text), got 2"),
        (["a b"], [5], "owners: owner index 5 out of range for 2 pools"),
        (["a b"], [-1], "owners: owner index -1 out of range for 2 pools"),
        (["a b"], [0.5], "owners[0]: expected an int, got float 0.5"),
    ],
)
def test_attributor_bad_input_names_the_argument(reward, texts, owners, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        of.OwenAttributor(reward)(texts, owners)


def test_attributor_with_a_text_reward_refuses_negative_owners():
    with pytest.raises(ValueError, match=r"owners: owner index -2 out of range \(owners are >= 0\)"):
        of.OwenAttributor(CountingReward())(["a b"], [-2])


def test_attributor_refuses_a_non_callable_reward():
    with pytest.raises(ValueError, match="reward: expected a callable"):
        of.OwenAttributor("bm25")


def test_aggregation_backends_agree_inside_the_attributor():
    reward = CountingReward()
    rng = random.Random(8)
    texts = [random_response(rng) for _ in range(5)]
    reference = of.OwenAttributor(reward, method="auto", budget=20, backend="torch")(texts, [0] * 5)
    for backend, device in BACKENDS:
        if device != "cpu":
            continue
        out = of.OwenAttributor(reward, method="auto", budget=20, backend=backend)(texts, [0] * 5)
        for a, b in zip(out, reference):
            assert_close(a.phi, b.phi, rtol=1e-10, atol=1e-10, what=backend)
    assert np.isfinite(sum(float(a.phi.sum()) for a in reference))


def test_bf16_packed_forward_matches_the_loop_to_bf16_tolerance(reward):
    rng = random.Random(9)
    texts = [random_response(rng) for _ in range(5)]
    coalitions = _batch(texts, [0] * 5)
    embeddings, seq_index = EncoderCoalitionEvaluator(reward, dtype=torch.bfloat16).embed(coalitions)
    reference, reference_index = EncoderCoalitionEvaluator(reward, dtype=torch.float32).embed(coalitions)
    got, expected = embeddings[torch.from_numpy(seq_index)], reference[torch.from_numpy(reference_index)]
    assert_close(got, expected, rtol=0.0, atol=4e-2, what="bf16 embeddings")
    assert (got * expected).sum(1).min() > 0.99  # cosine similarity of unit vectors


def _attention_reference(q, k, v, lengths):
    """Per-sequence float64 softmax attention: the plain definition."""
    out, start = torch.empty(q.shape, dtype=torch.float64), 0
    for length in lengths:
        qs, ks, vs = (x[start : start + length].transpose(0, 1).double() for x in (q, k, v))
        p = torch.softmax(qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        out[start : start + length] = (p @ vs).transpose(0, 1)
        start += length
    return out


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_varlen_attention_kernel_matches_softmax_attention(seed, with_bias):
    g = torch.Generator().manual_seed(seed)
    heads = [1, 3, 12, 2][seed]
    head_dim = [8, 24, 32, 48][seed]  # 8, 24 and 48 take the kernel's tail path (not a multiple of 16)
    lengths = [1, 15, 16, 17, 33] + torch.randint(1, 70, (int(torch.randint(1, 9, (1,), generator=g)),),
                                                  generator=g).tolist()
    total = sum(lengths)
    # q, k and v as strided views into one fused activation, as the packed forward passes them.
    qkv = 3 * torch.randn(total, 3, heads, head_dim, generator=g)
    q, k, v = qkv.unbind(1)
    bias = torch.randn(3, heads, head_dim, generator=g) if with_bias else None
    cu_seqlens = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    out = torch.full((total, heads, head_dim), float("nan"))
    torch.ops.ospo_fast.varlen_attention(
        q, k, v, cu_seqlens, max(lengths), head_dim**-0.5, out, None if bias is None else bias.reshape(-1)
    )
    if bias is not None:  # the reference sees q, k and v with the bias added
        q, k, v = (x + b for x, b in zip((q, k, v), bias))
    reference = _attention_reference(q, k, v, lengths)
    # As accurate as PyTorch's own float32 attention on the same inputs (large logits cost both some bits).
    sdpa, start = torch.empty_like(out), 0
    for length in lengths:
        sdpa[start : start + length] = torch.nn.functional.scaled_dot_product_attention(
            *(x[start : start + length].transpose(0, 1) for x in (q, k, v))
        ).transpose(0, 1)
        start += length
    sdpa_error = (sdpa.double() - reference).abs().max().item()
    assert (out.double() - reference).abs().max().item() <= 2 * sdpa_error + 1e-6
    assert_close(out.double(), reference, rtol=1e-4, atol=1e-4, what="varlen attention")


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
def test_opcheck_varlen_attention():
    qkv = torch.randn(20, 3, 2, 16)
    q, k, v = qkv.unbind(1)
    cu_seqlens = torch.tensor([0, 3, 4, 20], dtype=torch.int32)
    torch.library.opcheck(torch.ops.ospo_fast.varlen_attention.default,
                          (q, k, v, cu_seqlens, 16, 0.25, torch.empty(20, 2, 16)))
    torch.library.opcheck(
        torch.ops.ospo_fast.varlen_attention.default,
        (q, k, v, cu_seqlens, 16, 0.25, torch.empty(20, 2, 16), torch.randn(96)),
    )


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
@pytest.mark.parametrize("cols", [1, 15, 16, 37, 384])
def test_layer_norm_rows_kernel_matches_layer_norm(cols):
    g = torch.Generator().manual_seed(cols)
    x = 3 * torch.randn(203, cols, generator=g) + 5  # an offset mean tests the two-pass variance
    weight, bias = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    out = torch.full_like(x, float("nan"))
    torch.ops.ospo_fast.layer_norm_rows(x, weight, bias, 1e-12, out)
    reference = torch.nn.functional.layer_norm(x.double(), (cols,), weight.double(), bias.double(), 1e-12)
    aten = torch.nn.functional.layer_norm(x, (cols,), weight, bias, 1e-12)  # as accurate as ATen's float32
    assert (out.double() - reference).abs().max() <= 2 * (aten.double() - reference).abs().max() + 1e-6


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
@pytest.mark.parametrize("cols", [1, 15, 16, 37, 1536])
def test_bias_gelu_kernel_matches_gelu_of_the_sum(cols):
    g = torch.Generator().manual_seed(cols)
    x = 4 * torch.randn(211, cols, generator=g)
    x[0, 0], x[-1, -1] = 30.0, -30.0  # past erf's clamp: gelu(x) = x and 0
    bias = torch.randn(cols, generator=g)
    out = x.clone()
    torch.ops.ospo_fast.bias_gelu_(out, bias)
    reference = torch.nn.functional.gelu((x + bias).double())
    aten = torch.nn.functional.gelu(x + bias)
    assert (out.double() - reference).abs().max() <= 2 * (aten.double() - reference).abs().max() + 1e-6


@pytest.mark.skipif(not _extension.has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("low_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [1, 5, 37, 384])
def test_triton_residual_layer_norm_matches_add_layer_norm_cast(cols, low_dtype):
    """The fused residual step (add, LayerNorm, cast) against its three torch ops: the float32 stream as
    accurate as ATen's LayerNorm against float64, the low copy the cast of the kernel's stream (on CUDA
    exactly, rounded to nearest)."""
    from ospo_fast.kernels.residual_layer_norm import residual_layer_norm_

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(cols)
    rows = 67
    stream = (3 * torch.randn(rows, cols, generator=g) + 5).to(device)  # an offset mean tests the variance
    delta = torch.randn(rows, cols, generator=g).to(device, low_dtype)
    weight, bias = torch.randn(cols, generator=g).to(device), torch.randn(cols, generator=g).to(device)
    summed = stream + delta
    reference = torch.nn.functional.layer_norm(summed.double(), (cols,), weight.double(), bias.double(), 1e-12)
    aten = torch.nn.functional.layer_norm(summed, (cols,), weight, bias, 1e-12)
    low = torch.full((rows, cols), float("nan"), dtype=low_dtype, device=device)
    out = residual_layer_norm_(stream, delta, weight, bias, 1e-12, low)
    assert out is stream
    assert (stream.double() - reference).abs().max() <= 2 * (aten.double() - reference).abs().max() + 1e-6
    if stream.is_cuda:
        assert torch.equal(low, stream.to(low_dtype))
    else:  # the interpreter truncates float casts instead of rounding them: within one unit in the last place
        assert ((low.float() - stream).abs() <= torch.finfo(low_dtype).eps * stream.abs()).all()


@pytest.mark.skipif(not _extension.has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("cols", [1, 37, 384])
def test_triton_embedding_layer_norm_matches_gathers_add_layer_norm(cols):
    from ospo_fast.kernels.residual_layer_norm import embed_layer_norm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(cols)
    word, position = torch.randn(50, cols, generator=g).to(device), torch.randn(20, cols, generator=g).to(device)
    token_type, weight, bias = (torch.randn(cols, generator=g).to(device) for _ in range(3))
    ids, positions = (torch.randint(0, 50, (71,), generator=g).to(device),
                      torch.randint(0, 20, (71,), generator=g).to(device))
    summed = word[ids] + position[positions] + token_type
    reference = torch.nn.functional.layer_norm(summed.double(), (cols,), weight.double(), bias.double(), 1e-12)
    aten = torch.nn.functional.layer_norm(summed, (cols,), weight, bias, 1e-12)
    stream, low = embed_layer_norm(ids, positions, word, position, token_type, weight, bias, 1e-12, torch.bfloat16)
    assert stream.dtype == torch.float32 and low.dtype == torch.bfloat16 and stream.shape == (71, cols)
    assert (stream.double() - reference).abs().max() <= 2 * (aten.double() - reference).abs().max() + 1e-6
    assert ((low.float() - stream).abs() <= torch.finfo(torch.bfloat16).eps * stream.abs()).all()


def test_fused_residual_steps_give_the_unfused_reduced_precision_forward(reward, monkeypatch):
    """The bf16 forward with the fused Triton embedding and residual steps (the CUDA path; without a GPU, on
    the CPU in the interpreter) against the same forward with torch's gathers, adds, layer_norm and cast."""
    if not _extension.has_triton():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        reward = _reward("cuda")
    rng = random.Random(13)
    coalitions = _batch([random_response(rng) for _ in range(2)], [0] * 2,
                        budget=12)  # the interpreter: a program per token
    embeddings, calls = {}, []
    for fused in (False, True):
        evaluator = EncoderCoalitionEvaluator(reward, dtype=torch.bfloat16)
        monkeypatch.setattr(evaluator.forward, "_fused_norm", lambda device, fused=fused: calls.append(fused) or fused)
        got, index = evaluator.embed(coalitions)
        embeddings[fused] = got[torch.from_numpy(index)].float().cpu()
    assert calls.count(True) == 13  # fused: the embeddings and two residual steps per layer
    assert_close(embeddings[True], embeddings[False], rtol=0.0, atol=1e-2, what="fused vs unfused bf16 embeddings")
    assert (embeddings[True] * embeddings[False]).sum(1).min() > 0.999


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
def test_opcheck_bias_gelu():
    torch.library.opcheck(torch.ops.ospo_fast.bias_gelu_.default, (torch.randn(7, 24), torch.randn(24)))


@pytest.mark.skipif(not _extension.has_cpp(), reason="ospo_fast._C is not built")
def test_opcheck_layer_norm_rows():
    x = torch.randn(7, 24)
    torch.library.opcheck(torch.ops.ospo_fast.layer_norm_rows.default,
                          (x, torch.randn(24), torch.randn(24), 1e-5, torch.empty(7, 24)))


def test_packed_forward_kernel_path_equals_the_sdpa_path_and_its_buffers_do_not_leak(reward):
    """The default CPU attention (the C++ kernel where built) against the per-length SDPA path, on batches
    of growing and shrinking size: the reused activation buffers never change a returned result."""
    rng = random.Random(11)
    fast = EncoderCoalitionEvaluator(reward)
    sdpa = EncoderCoalitionEvaluator(reward, attention="sdpa")
    kept = []
    for n in (6, 2, 9):
        coalitions = _batch([random_response(rng) for _ in range(n)], [0] * n)
        got, index = fast.embed(coalitions)
        expected, expected_index = sdpa.embed(coalitions)
        assert_close(got[torch.from_numpy(index)], expected[torch.from_numpy(expected_index)], rtol=1e-5, atol=2e-5,
                     what=f"kernel vs SDPA, {n} responses")
        kept.append((got, got.clone()))
    for got, snapshot in kept:  # earlier results are untouched by later calls
        assert torch.equal(got, snapshot)
    fast.forward.release_buffers()
    again, _ = fast.embed(coalitions)
    assert torch.equal(again, kept[-1][1])


def test_chunked_forwards_give_the_values_of_one_forward(reward):
    """``chunk_tokens`` splits a batch into several forwards (memory); the ranges cover every sequence in
    order, each within the bound unless one sequence alone exceeds it, and the values do not change."""
    from ospo_fast.evaluate import _chunks

    rng = random.Random(14)
    coalitions = _batch([random_response(rng) for _ in range(4)], [0, 1, 0, 1])
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


def test_runs_are_the_maximal_runs_of_equal_lengths():
    """PackedSequences.runs() against the plain walk, on sorted and unsorted lengths, empty and single."""
    def walk(lengths):
        runs, token, s = [], 0, 0
        while s < len(lengths):
            e = s
            while e < len(lengths) and lengths[e] == lengths[s]:
                e += 1
            runs.append((token, s, e - s, int(lengths[s])))
            token, s = token + (e - s) * int(lengths[s]), e
        return runs

    rng = np.random.default_rng(8)
    for trial in range(300):
        lengths = rng.integers(1, 5, size=int(rng.integers(0, 25)))
        if trial % 2:
            lengths = np.sort(lengths)
        packed = PackedSequences(torch.zeros(0), torch.zeros(0), torch.zeros(0), lengths)
        assert packed.runs() == walk(lengths)
        assert packed.runs() is packed.runs()  # computed once


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("method", ["segments", "triton"])
@pytest.mark.parametrize("cols,dtype", [(24, torch.float32), (37, torch.bfloat16)])
def test_gpu_poolings_equal_pooling_by_runs(pooling, method, cols, dtype):
    """The GPU poolings (segment sums by sequence id; the Triton kernel, a program per sequence) against the
    CPU one (views per run of equal lengths), on odd lengths and widths, runs of one, sequences longer than
    the kernel's row block; written into a slice of a larger output, whose other rows stay untouched."""
    if method == "triton" and not _extension.has_triton():
        pytest.skip("triton is not installed")
    g = torch.Generator().manual_seed(5 + cols)
    lengths = np.sort(np.concatenate([torch.randint(1, 19, (37,), generator=g).numpy(), [40, 41]]))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
    device = "cuda" if method == "triton" and torch.cuda.is_available() else "cpu"
    packed = PackedSequences(
        input_ids=torch.zeros(int(cu[-1]), dtype=torch.long, device=device),
        position_ids=torch.from_numpy(positions).to(device),
        cu_seqlens=torch.from_numpy(cu).to(device, torch.int32),
        lengths=lengths,
    )
    hidden = torch.randn(int(cu[-1]), cols, generator=g).to(device, dtype)
    by_runs = pool_packed(hidden.cpu().float(), packed, pooling, method="runs")
    frame = torch.full((len(lengths) + 3, cols), 7.0, device=device)
    got = pool_packed(hidden, packed, pooling, method=method, out=frame[2:-1])
    assert got.data_ptr() == frame[2:-1].data_ptr()
    assert_close(got.cpu(), by_runs, rtol=1e-5, atol=1e-6, what=f"{method} pooling")
    assert bool((frame[:2] == 7).all() and (frame[-1] == 7).all())


def test_pooling_method_is_checked():
    packed = PackedSequences(torch.zeros(2, dtype=torch.long), torch.arange(2), torch.tensor([0, 2], dtype=torch.int32),
                             np.array([2]))
    with pytest.raises(ValueError, match="method: expected one of"):
        pool_packed(torch.zeros(2, 4), packed, "mean", method="atomic")


def test_host_arrays_staged_in_one_buffer_come_back_whole():
    """The one-transfer bundle of a device half (``to_device_all``): every array, of any dtype and shape (odd
    sizes, empty, 2-D, strided), is found unchanged in its aligned place of the staging buffer."""
    from ospo_fast._device import _BUNDLE_ALIGN, _stage, _unstage

    rng = np.random.default_rng(5)
    arrays = [
        rng.integers(-(1 << 40), 1 << 40, size=int(rng.integers(0, 40))),
        rng.standard_normal(7).astype(np.float32),
        np.zeros(0, dtype=np.int32),
        rng.standard_normal((3, 5)),
        rng.integers(0, 2, size=13).astype(bool),
        rng.integers(0, 1 << 30, size=(9, 4)).astype(np.int32)[:, 1],  # not contiguous
        np.arange(1, dtype=np.int64),
    ]
    tensors = [torch.from_numpy(a) for a in arrays]
    staging, starts = _stage(tensors, pin=False)
    assert all(s % _BUNDLE_ALIGN == 0 for s in starts)
    back = _unstage(staging, tensors, starts)
    for a, t in zip(arrays, back):
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        assert np.array_equal(t.numpy(), a)
    assert of._device.to_device_all(arrays, torch.device("cpu"))[3].data_ptr() == tensors[3].data_ptr()  # CPU: no copy


@pytest.mark.gpu
def test_host_arrays_go_to_cuda_in_one_transfer_without_sync():
    from ospo_fast._device import to_device_all

    rng = np.random.default_rng(6)
    arrays = ([rng.integers(0, 1000, size=n) for n in (0, 1, 17, 1000)]
              + [rng.standard_normal((4, 3)).astype(np.float32)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = to_device_all(arrays, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, t in zip(arrays, got):
        assert t.is_cuda and np.array_equal(t.cpu().numpy(), a)


@pytest.mark.gpu
def test_packed_values_on_cuda_need_no_host_sync_and_match_the_cpu(reward):
    """The device half of a packed evaluation (pack, bf16 forward with varlen attention, pool, score) runs
    with no stream synchronisation and gives the fp32 CPU values to bf16 tolerance."""
    rng = random.Random(21)
    texts = [random_response(rng) for _ in range(9)]
    coalitions = _batch(texts, [rng.randrange(2) for _ in texts])
    expected, _ = EncoderCoalitionEvaluator(reward)(coalitions)
    evaluator = EncoderCoalitionEvaluator(_reward("cuda"))
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


@pytest.mark.gpu
def test_attributor_on_cuda_never_synchronises_the_host():
    """A whole attribution on CUDA (segmentation, plans, packed evaluation, Owen aggregation, the per-response
    split) runs with torch's sync debug mode raising on any synchronisation; its results match the CPU's."""
    rng = random.Random(23)
    texts = [random_response(rng) for _ in range(7)]
    owners = [rng.randrange(2) for _ in texts]
    attributor = of.OwenAttributor(_reward("cuda"), budget=40, seed=1)
    attributor(texts, owners)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attributor(texts, owners)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = of.OwenAttributor(_reward(), budget=40, seed=1)(texts, owners)
    assert all(a.phi.is_cuda for a in out)
    # bf16 on CUDA against fp32 on the CPU, compared on the efficiency sums v(N) - v(empty): a near-tie in
    # a ranking may swap, so bound the typical and the worst difference.
    diffs = np.array([abs(float(a.phi.sum()) - float(b.phi.sum())) for a, b in zip(out, expected)])
    assert np.median(diffs) < 0.02 and diffs.max() < 0.2, diffs


def test_attention_choice_is_checked(reward):
    with pytest.raises(ValueError, match=r"attention: expected one of \('auto', 'flash', 'sdpa'\)"):
        EncoderCoalitionEvaluator(reward, attention="flex")
    # flash attention needs CUDA and reduced precision; on the CPU in float32 it is refused with the reason,
    # at construction rather than at the first forward.
    with pytest.raises(ValueError, match="attention='flash' needs"):
        EncoderCoalitionEvaluator(reward, attention="flash", dtype=torch.float32)
