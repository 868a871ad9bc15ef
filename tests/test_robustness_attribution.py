"""OwenAttributor and the rewards under hostile and demanding use: threads, unsupported options, corrupt
caches, mismatched arguments, extreme gains, bad reward outputs and odd text."""

from __future__ import annotations

import random
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import iphone_charger_pool
from evaluation_inputs import dense_reward, random_response

import ospo_fast as of


@pytest.fixture(scope="module")
def reward():
    return dense_reward()


def test_threads_sharing_one_attributor_get_the_single_threaded_values(reward):
    # Exact plans involve no randomness, so each call's result is fixed by its texts: any difference comes
    # from the threads sharing the packed forward's buffers or the phrase cache.
    rng = random.Random(7)
    batches = [[random_response(rng) for _ in range(3)] for _ in range(12)]
    owners = [[rng.randrange(2) for _ in b] for b in batches]
    expected = [of.OwenAttributor(reward, method="exact")(b, o).phi for b, o in zip(batches, owners)]
    shared = of.OwenAttributor(reward, method="exact")
    got, errors = [None] * len(batches), []
    start = threading.Barrier(4)

    def work(worker):
        start.wait()
        try:
            for _ in range(2):
                for j in range(worker, len(batches), 4):
                    got[j] = shared(batches[j], owners[j]).phi
        except Exception as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for j, (g, e) in enumerate(zip(got, expected)):
        for a, b in zip(g, e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"batch {j}")


# ----------------------------------------------------------------------------------------------------
# Options the packed path cannot honour are refused; only the automatic choice falls back, and says so.


def _text_reward(texts, owners):
    return torch.tensor([len(set(t.split())) / 10 for t in texts], dtype=torch.float64)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(encoder_dtype=torch.float64),
         r"encoder_dtype: the packed forward supports None \(default\), torch.float32, torch.bfloat16, torch.float16"),
        (dict(encoder_dtype="float64"), r"encoder_dtype: .*got 'float64'"),
        (dict(attention="flex"), r"attention: expected one of \('auto', 'flash', 'sdpa'\), got 'flex'"),
        (dict(attention="flash", encoder_dtype=torch.float32), r"attention='flash'.*needs flash-attn"),
        (dict(evaluator="text", encoder_dtype=torch.bfloat16), r"encoder_dtype: only the packed evaluator uses it"),
        (dict(evaluator="text", attention="sdpa"), r"attention: only the packed evaluator uses it"),
    ],
)
def test_packed_options_that_cannot_be_honoured_raise(reward, options, message):
    with pytest.raises(ValueError, match=message):
        of.OwenAttributor(reward, **options)


def test_explicit_packed_options_with_a_text_reward_raise():
    with pytest.raises(ValueError, match=r"encoder_dtype=torch.bfloat16: the packed evaluator cannot run"):
        of.OwenAttributor(_text_reward, encoder_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"attention='sdpa': the packed evaluator cannot run"):
        of.OwenAttributor(_text_reward, attention="sdpa")


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16", "float32"])
def test_encoder_dtype_given_by_name_is_honoured(reward, name):
    attributor = of.OwenAttributor(reward, encoder_dtype=name)
    assert attributor.packed is not None
    assert attributor.packed.forward.dtype == getattr(torch, name.replace("torch.", ""))


def test_automatic_fallback_of_an_encoder_reward_warns_once_and_a_text_reward_is_silent(reward):
    texts, labels = iphone_charger_pool()
    items = [t[:200] for t in texts[:30]]
    lsa = of.rewards.DenseRetrievalReward(
        items, [list(range(30))], [[of.data.esci_gain(x) for x in labels[:30]]],
        encoder=of.rewards.LSAEncoder(items, dim=8), cache_dir=False,
    )
    with pytest.warns(RuntimeWarning, match="evaluator='auto': the packed encoder forward cannot run") as record:
        attributor = of.OwenAttributor(lsa)
        attributor(["usb c cable, fast charger"], [0])
    assert attributor.packed is None and len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert of.OwenAttributor(_text_reward).packed is None
        assert of.OwenAttributor(reward).packed is not None


# ----------------------------------------------------------------------------------------------------
# Settings that can only fail later fail at construction.


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(budget=1), r"budget: expected an int >= 2"),
        (dict(backend="gpu"), r"backend: expected one of \('auto', 'torch', 'cpp', 'cuda', 'triton'\), got 'gpu'"),
        (dict(seed=-1), r"seed: expected a non-negative int"),
        (dict(segmenter="words"), r"segmenter: expected a callable"),
        (dict(method="shapley"), r"method: expected 'exact', 'sampled' or 'auto'"),
    ],
)
def test_bad_attributor_settings_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        of.OwenAttributor(_text_reward, **options)


# ----------------------------------------------------------------------------------------------------
# Arguments of a call


def test_segmentation_of_another_text_is_refused_naming_its_index():
    attributor = of.OwenAttributor(_text_reward)
    texts = ["usb c cable, fast charger", "wireless pad and wall plug"]
    segmentations = attributor.segment(texts)
    with pytest.raises(ValueError, match=r"segmentations\[1\]: is the segmentation of another text"):
        attributor(texts, [0, 1], segmentations=[segmentations[0], segmentations[0]])
    with pytest.raises(ValueError, match=r"segmentations\[0\]: expected a Segmentation, got str"):
        attributor(texts, [0, 1], segmentations=["usb c cable", segmentations[1]])
    out = attributor(texts, [0, 1], segmentations=segmentations)  # the matching ones still work
    assert [a.segmentation for a in out] == segmentations


@pytest.mark.parametrize(
    "output, message",
    [
        (lambda n: ["high"] * n, r"reward bad_reward: returned \['high'.*not numbers"),
        (lambda n: [None] * n, r"reward bad_reward: returned \[None.*not numbers"),
        (lambda n: [[0.5, 0.5]] * (n - 1) + [[0.5]], r"reward bad_reward: returned \[\[0.5, 0.5\].*not numbers"),
        (lambda n: [[0.5, 0.25]] * n, r"reward bad_reward: returned shape \(\d+, 2\)"),
        (lambda n: "0.5", r"reward bad_reward: returned a str"),
        (lambda n: [True] * n, r"reward bad_reward: returned values of dtype torch.bool"),
    ],
)
def test_a_reward_returning_non_numbers_is_named_with_what_was_expected(output, message):
    def bad_reward(texts, owners):
        return output(len(texts))

    with pytest.raises(ValueError, match=message) as info:
        of.OwenAttributor(bad_reward)(["usb c cable, fast charger"], [0])
    assert "finite real numbers" in str(info.value) and "one per text" in str(info.value)


def test_a_reward_returning_a_column_or_a_numpy_array_is_accepted():
    texts, owners = ["usb c cable, fast charger and wall plug"], [0]
    expected = of.OwenAttributor(_text_reward)(texts, owners)[0].phi
    for wrap in (lambda v: v[:, None], lambda v: v.numpy(), lambda v: v.tolist()):
        got = of.OwenAttributor(lambda t, o: wrap(_text_reward(t, o)))(texts, owners)[0].phi
        torch.testing.assert_close(got, expected)


def test_numpy_integer_owners_are_accepted_like_python_ints(reward):
    texts = ["usb c cable, fast charger", "wireless pad and wall plug", "braided cord"]
    attributor = of.OwenAttributor(reward, method="exact")
    expected = attributor(texts, [1, 0, 1]).phi
    for owners in ([np.uint64(1), np.int64(0), 1], np.array([1, 0, 1], dtype=np.uint8),
                   np.array([1, 0, 1], dtype=object), (np.int16(1), np.intc(0), np.int64(1))):
        got = attributor(texts, owners)
        assert [a.owner for a in got] == [1, 0, 1] and all(type(a.owner) is int for a in got)
        for a, b in zip(got.phi, expected):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"owners\[1\]: expected an int, got float"):
        attributor(texts, [1, 0.0, 1])
    with pytest.raises(ValueError, match=r"owners\[0\]: expected an int, got bool"):
        attributor(texts, [np.bool_(True), 0, 1])


def test_lone_surrogates_are_segmented_and_scored_like_the_replacement_character(reward):
    # No UTF-8 tokenizer accepts a lone surrogate; the encoder reads it as U+FFFD (one character for one, so
    # the segments' spans hold), on the packed path and the text path alike.
    text = "usb c \ud800 cable, fast \udfff charger"
    segmentation = of.Segmenter()(text)
    assert all(text[s:e] == seg for (s, e), seg in zip(segmentation.spans, segmentation.segments))
    packed = of.OwenAttributor(reward, method="exact")([text], [0])[0]
    loop = of.OwenAttributor(reward, method="exact", evaluator="text")([text], [0])[0]
    torch.testing.assert_close(packed.values.double(), loop.values.double(), rtol=1e-4, atol=1e-4)
    replaced = of.OwenAttributor(reward, method="exact")(
        [text.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd")], [0]
    )[0]
    torch.testing.assert_close(packed.phi, replaced.phi)
    assert torch.isfinite(reward([text, "\ud800"], [0, 1])).all()
    bm25 = of.rewards.BM25Reward(["usb c cable", "fast charger", "wall plug"], [[0, 1, 2]], [[1.0, 0.0, 0.1]])
    assert torch.isfinite(of.OwenAttributor(bm25)([text], [0])[0].phi).all()


def test_attributor_passes_the_exact_cap_to_its_plans():
    from ospo_fast import OwenAttributor

    def reward(texts, owners):
        return [float(len(t)) for t in texts]

    text = ", ".join(f"w{i}" for i in range(6))  # one sentence of 6 phrases: 64 coalitions
    with pytest.raises(ValueError, match="max_exact_coalitions"):
        OwenAttributor(reward, method="exact", max_exact_coalitions=32)([text], [0])
    out = OwenAttributor(reward, method="exact", max_exact_coalitions=64)([text], [0])
    assert out[0].plan.num_coalitions == 64
