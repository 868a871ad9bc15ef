"""OwenAttributor end to end: its values against the reward game, duplicates and pipelining, its results
(token credit, HTML) and its argument checks."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close
from evaluation_inputs import CountingReward, dense_reward, random_response

import ospo_fast as of


@pytest.fixture(scope="module")
def reward():
    """On the CPU even where a GPU is present: the float32 path compares to fp32 tolerance (on CUDA the packed
    forward defaults to bf16; a GPU test builds its own reward)."""
    return dense_reward()


def test_duplicate_responses_are_evaluated_once(reward):
    rng = random.Random(4)
    texts = [random_response(rng) for _ in range(3)]
    attr = of.OwenAttributor(reward, method="exact")
    once = attr(texts, [0, 0, 0])
    thrice = attr(texts * 3, [0] * 9)
    assert thrice.num_evaluations == once.num_evaluations
    for a, b in zip(once, thrice[6:]):
        torch.testing.assert_close(a.phi, b.phi)


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
    """credit_on_tokens with a fast tokenizer (the encoder's): every token inside segment i gets
    phi_i / (its token count), every other token (think block, tags, punctuation, padding) 0, and each
    response's credit sums to its Owen values; an empty answer gets no credit."""
    rng = random.Random(15)
    texts = [random_response(rng) for _ in range(5)] + ["<think>hmm</think><answer> </answer>"]
    out = of.OwenAttributor(reward, budget=30, seed=2)(texts, [0, 1, 0, 1, 0, 1])
    tokenizer = reward.encoder.tokenizer
    tc = of.credit_on_tokens(out, tokenizer)
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
    tc = of.credit_on_tokens(out, tokenizer)
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
        of.credit_on_tokens(out, SlowTokenizer())


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


@pytest.mark.gpu
def test_attributor_on_cuda_never_synchronises_the_host():
    """A whole attribution on CUDA (segmentation, plans, packed evaluation, Owen aggregation, the per-response
    split) runs with torch's sync debug mode raising on any synchronisation; its results match the CPU's."""
    rng = random.Random(23)
    texts = [random_response(rng) for _ in range(7)]
    owners = [rng.randrange(2) for _ in texts]
    attributor = of.OwenAttributor(dense_reward("cuda"), budget=40, seed=1)
    attributor(texts, owners)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attributor(texts, owners)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = of.OwenAttributor(dense_reward(), budget=40, seed=1)(texts, owners)
    assert all(a.phi.is_cuda for a in out)
    # bf16 on CUDA against fp32 on the CPU, compared on the efficiency sums v(N) - v(empty): a near-tie in
    # a ranking may swap, so bound the typical and the worst difference.
    diffs = np.array([abs(float(a.phi.sum()) - float(b.phi.sum())) for a, b in zip(out, expected)])
    assert np.median(diffs) < 0.02 and diffs.max() < 0.2, diffs


def test_packed_evaluator_asked_for_a_text_reward_raises_with_packed_supports_reason():
    with pytest.raises(ValueError, match=re.escape("evaluator='packed': the packed evaluator cannot run for this "
                                                   "reward: reward: expected an encoder reward")):
        of.OwenAttributor(CountingReward(), evaluator="packed")
