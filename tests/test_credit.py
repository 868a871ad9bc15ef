"""The controlled credit-assignment benchmark: its construction, the worth of its hints on the real reward,
and the attribution check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ospo_fast.data as data
from ospo_fast.app.credit import (
    attribution_check,
    credit_answer,
    credit_task,
    hint_mix,
    hint_phrases,
    prompt_hints,
)
from ospo_fast.segment import Segmenter

WORDS = re.compile(r"[a-z0-9]+")


@pytest.fixture(scope="module")
def base():
    return data.default_task()


@pytest.fixture(scope="module")
def task(base):
    return credit_task(base, seed=0)


@pytest.fixture(scope="module")
def reward(base):
    return data.default_task().reward("dense")


def test_hints_come_from_their_items_and_are_marked(base, task):
    assert len(task) > len(base) // 2
    for s in task.samples:
        true, decoys = s.info["true_hints"], s.info["decoy_hints"]
        target = base.items[
            base.pools[s.owner][max(range(len(base.gains[s.owner])), key=base.gains[s.owner].__getitem__)]
        ]
        decoy = base.items[s.info["decoy_item"]]
        assert s.info["decoy_item"] in base.pools[s.owner] and decoy != target
        for hint in true:
            assert f"[+] {hint}" in s.text and set(hint.split()) <= set(WORDS.findall(target.lower()))
            assert set(hint.split()) - set(WORDS.findall(decoy.lower()))  # a word the decoy lacks
        for hint in decoys:
            assert f"[-] {hint}" in s.text and set(hint.split()) <= set(WORDS.findall(decoy.lower()))
        for hint in true + decoys:
            assert not set(hint.split()) & set(WORDS.findall(s.query.lower()))
            assert Segmenter()(hint).num_players == 1
        assert s.prompt[-1]["content"] == s.text and s.text.startswith(f"Request: {s.query}\n")


def test_task_is_seeded(base, task):
    assert [s.text for s in credit_task(base, seed=0).samples] == [s.text for s in task.samples]
    assert [s.text for s in credit_task(base, seed=1).samples] != [s.text for s in task.samples]


def test_true_hints_raise_the_reward_and_decoys_lower_it(task, reward):
    # Measured on the real MiniLM reward, over every sample: one hint added to the request at a time.
    owners = [s.owner for s in task.samples]
    alone = reward([s.query for s in task.samples], owners)
    for kind, sign in (("true_hints", 1), ("decoy_hints", -1)):
        deltas = torch.stack([
            reward([credit_answer(s.query, [s.info[kind][k]]) for s in task.samples], owners) - alone
            for k in range(2)
        ])
        assert sign * float(deltas.mean()) > 0.02, kind


def test_hint_phrases_skip_request_words_and_shared_phrases():
    item = "Hiking boots, waterproof, leather upper, for men. Vibram sole"
    other = "Leather dress shoes, for men. rubber sole"
    assert hint_phrases(item, other, request="hiking boots") == ["waterproof", "leather upper", "vibram sole"]
    # "men" is in the other item too; a segment that shares a word with the request is left out.
    assert hint_phrases("Waterproof hiking boots, for men", other, request="hiking boots") == []


def test_attribution_check_finds_the_signs(task, reward):
    out = attribution_check(task, reward, budget=64, seed=0, limit=40)
    assert out["num_answers"] == 40 and out["num_segments"] == 160
    for method in ("exact", "sampled", "leave_one_out"):
        assert 0 <= out[method]["right_sign"] <= 1 and 0 <= out[method]["zero"] <= 1
    assert out["exact"]["right_sign"] > 0.6 and out["sampled"]["right_sign"] > 0.6
    assert out["exact"]["right_sign"] > out["leave_one_out"]["right_sign"]
    assert out["mean_value"]["true"] > out["mean_value"]["decoy"]


def test_bad_arguments_are_named(base):
    with pytest.raises(ValueError, match="num_true"):
        credit_task(base, num_true=0)
    with pytest.raises(ValueError, match="lower num_true"):
        credit_task(base, num_true=50)


def test_warm_start_teaches_the_format_not_the_choice(task):
    from ospo_fast.app.credit import warm_start_pairs

    prompts, targets = warm_start_pairs(task, copies=8, seed=0)
    assert len(prompts) == len(targets) == 8 * len(task)
    kept = {"true_hints": 0, "decoy_hints": 0}
    for prompt, target, s in zip(prompts, targets, [s for s in task.samples for _ in range(8)]):
        assert prompt == s.prompt and target.startswith(s.query)
        phrases = target[len(s.query):].split(", ")[1:]
        assert set(phrases) <= set(s.info["true_hints"]) | set(s.info["decoy_hints"])
        for kind in kept:
            kept[kind] += len(set(phrases) & set(s.info[kind]))
    # True hints and decoys are kept about equally often: the warm start does not teach the choice.
    assert abs(kept["true_hints"] - kept["decoy_hints"]) < 0.1 * sum(kept.values())


def test_warm_start_pseudo_requests_teach_copying_any_text(task):
    from ospo_fast.app.credit import CREDIT_SYSTEM, warm_start_pairs

    prompts, targets = warm_start_pairs(task, copies=1, seed=0, extra=50, items=task.items[:20])
    assert len(prompts) == len(task) + 50
    for prompt, target in zip(prompts[len(task):], targets[len(task):]):
        assert prompt[0] == {"role": "system", "content": CREDIT_SYSTEM}
        text = prompt[-1]["content"]
        request = text.split("\n")[0].removeprefix("Request: ")
        assert target.startswith(request) and text.count("[+]") == 2 and text.count("[-]") == 2
        words = set(request.split())
        assert any(words <= set(WORDS.findall(item.lower())) for item in task.items[:20])


def test_credit_hm_task_loads_the_hm_articles_and_needs_their_files():
    from ospo_fast.app.experiment import RunSettings, load_task

    with pytest.raises(ValueError, match="credit-hm.*--hm-articles"):
        load_task(RunSettings(task="credit-hm"))
    hm = Path(__file__).resolve().parents[2] / "shared" / "data" / "hm"
    if not hm.is_dir():
        pytest.skip(f"the H&M extract is not at {hm}")
    settings = RunSettings(task="credit-hm", hm_articles=str(hm / "articles.csv"),
                           hm_customers=str(hm / "customers.csv"), hm_transactions=str(hm / "transactions_train.csv"))
    assert settings.is_credit_task and settings.warm_start_steps_or_default() > 0
    train, val, test = load_task(settings, seed=0)
    base = data.hm_task(data.load_hm(hm / "articles.csv", hm / "customers.csv", hm / "transactions_train.csv"))
    assert train.items == base.items  # the H&M catalogue, not the shipped ESCI items
    assert len(train) and len(val) and len(test)
    for s in train.samples[:20]:
        assert s.info["true_hints"] and all(f"[+] {h}" in s.text for h in s.info["true_hints"])
        assert all(f"[-] {h}" in s.text for h in s.info["decoy_hints"])


def test_hint_mix_counts_the_hints_each_answer_keeps(task):
    samples = task.samples[:30]
    oracle = [credit_answer(s.query, s.info["true_hints"]) for s in samples]
    assert hint_mix(samples, oracle) == {"true hints kept": 1.0, "decoys kept": 0.0}
    everything = [credit_answer(s.query, prompt_hints(s)) for s in samples]
    assert hint_mix(samples, everything) == {"true hints kept": 1.0, "decoys kept": 1.0}
    assert hint_mix(samples, [s.query for s in samples]) == {"true hints kept": 0.0, "decoys kept": 0.0}
    # One decoy and the first true hint, in upper case and another order: half of each kind.
    mixed = [credit_answer(s.query, [s.info["decoy_hints"][0].upper(), s.info["true_hints"][0]]) for s in samples]
    halves = [(1 / len(s.info["true_hints"]), 1 / len(s.info["decoy_hints"])) for s in samples]
    expected = {"true hints kept": sum(t for t, _ in halves) / len(samples),
                "decoys kept": sum(d for _, d in halves) / len(samples)}
    assert hint_mix(samples, mixed) == pytest.approx(expected)
