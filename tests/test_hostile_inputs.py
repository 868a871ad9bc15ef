"""Inputs a careless or hostile user passes to the library's public functions: each is either handled as
intended or refused with an error that names the argument (one test per finding of the second hostile probe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ospo_fast as of

HM = Path(__file__).resolve().parents[2] / "shared" / "data" / "hm"


# ---------------------------------------------------------------------------------------------------------
# Silently wrong results


@pytest.mark.parametrize("sizes", [[2.5, 1], [True, True], [2, 0], [1, -1], ["2"]])
def test_from_sizes_refuses_fractional_bool_and_non_positive_sizes(sizes):
    with pytest.raises(ValueError, match=r"sizes\[\d\]: expected a positive int"):
        of.CoalitionStructure.from_sizes(sizes)


def test_from_sizes_takes_numpy_ints():
    assert of.CoalitionStructure.from_sizes(np.array([2, 1])) == of.CoalitionStructure([[0, 1], [2]])


@pytest.mark.parametrize("task, template", [("esci", "Write a query"), ("hm", "A customer aged {age} wants")])
def test_a_template_without_the_sample_field_is_refused(task, template):
    field = {"esci": "request", "hm": "history"}[task]
    with pytest.raises(ValueError, match=rf"template: has no \{{{field}\}} field"):
        of.data.check_template(template, task)


def test_esci_task_refuses_a_template_that_makes_every_prompt_the_same():
    frame = of.data.load_default_esci()
    with pytest.raises(ValueError, match="template"):
        of.data.esci_task(frame, template="Write a query")


@pytest.mark.skipif(not HM.is_dir(), reason="the H&M extract (../shared/data/hm) is not here")
def test_a_csv_cut_off_mid_row_is_refused(tmp_path):
    for name in ("articles.csv", "customers.csv", "transactions_train.csv"):
        (tmp_path / name).write_bytes((HM / name).read_bytes())
    articles = tmp_path / "articles.csv"
    data = articles.read_bytes()
    articles.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"articles.csv: its last row has \d+ of the header's \d+ fields.*cut off"):
        of.data.load_hm(articles, tmp_path / "customers.csv", tmp_path / "transactions_train.csv")


def test_a_csv_without_a_final_newline_but_complete_rows_is_read(tmp_path):
    from ospo_fast.data._common import check_csv_complete

    path = tmp_path / "t.csv"
    path.write_text('a,b,c\n1,2,"x\ny"\n3,4,5')  # a quoted newline, and no newline at the end
    check_csv_complete(path, "file")
    path.write_text("a,b,c\n1,2,3\n3,4")
    with pytest.raises(ValueError, match="cut off mid-row"):
        check_csv_complete(path, "file")


@pytest.mark.parametrize("invisible", ["\u200b", "\u2060", "\ufeff"])
def test_zero_width_spaces_separate_like_spaces_and_never_start_or_end_a_segment(invisible):
    text = f"{invisible}red{invisible}shoes {invisible}for{invisible} men{invisible}"
    sg = of.Segmenter()(text)
    assert [s.replace(invisible, " ") for s in sg.segments] == ["red shoes", "for  men"]
    for segment in sg.segments:
        assert segment[0] != invisible and segment[-1] != invisible
    # The same text with plain spaces is cut the same way.
    plain = of.Segmenter()(text.replace(invisible, " "))
    assert sg.spans == plain.spans


def test_coalition_texts_take_numpy_bool_masks():
    sg = of.Segmenter()("red shoes for men. blue hat")
    expected = of.coalition_text(sg, [True, False, True])
    assert of.coalition_text(sg, np.array([True, False, True])) == expected
    assert of.coalition_text(sg, [np.True_, np.False_, np.True_]) == expected
    assert of.coalition_text(sg, [np.int64(1), 0, 1]) == expected
    assert of.coalition_texts(sg, np.array([[True, False, True]])) == [expected]


# ---------------------------------------------------------------------------------------------------------
# Crashes deep inside instead of a clear error


@pytest.mark.parametrize("offsets", ["garbage", [[0, "a"]], 7, None])
def test_token_player_map_refuses_what_is_not_offsets(offsets):
    sg = of.Segmenter()("red shoes")
    with pytest.raises(ValueError, match="offsets"):
        of.token_player_map(sg, offsets)
    with pytest.raises(ValueError, match="offsets"):
        of.token_player_maps([sg], offsets if not isinstance(offsets, list) else [offsets])


@pytest.mark.parametrize("kwargs, name", [(dict(pool_size=0), "pool_size"), (dict(pool_size=2.5), "pool_size"),
                                          (dict(seed=-1), "seed")])
def test_default_task_checks_pool_size_and_seed(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        of.data.default_task(**kwargs)


def test_splits_refuse_a_negative_seed():
    task = of.data.default_task()
    with pytest.raises(ValueError, match="^seed: expected a non-negative int"):
        task.split(seed=-3)
    with pytest.raises(ValueError, match="^seed: expected a non-negative int"):
        task.three_way_split(seed=-3)


def test_grpo_loss_refuses_an_infinite_temperature():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="temperature"):
        of.grpo_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), torch.ones(2, 3),
                     temperature=float("inf"))
