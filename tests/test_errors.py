"""Bad input raises ValueError naming the argument and the problem."""

from __future__ import annotations

import pytest
import torch

import ospo_fast as of


@pytest.mark.parametrize(
    "unions,message",
    [
        ([[0, 1], [1, 2]], "player 1 is in unions 0 and 1"),
        ([[0, 0], [1]], "player 0 is twice in union 0"),
        ([[0], [2]], "missing player"),
        ([[0], []], "union 1 is empty"),
        ([list(range(of.MAX_PLAYERS + 1))], "above the supported maximum"),
        ([[0, -1]], "negative"),
        ([[0, 1.5]], "not an integer"),
        (7, "expected a list of lists"),
    ],
)
def test_bad_structure_raises_value_error_naming_the_problem(unions, message):
    with pytest.raises(ValueError, match="unions") as info:
        of.CoalitionStructure(unions)
    assert message in str(info.value)


def test_value_fn_returning_wrong_shape_is_refused():
    s = of.CoalitionStructure([[0, 1], [2]])
    with pytest.raises(ValueError, match=r"value_fn\(masks\): returned shape \(3,\), expected \(8,\)"):
        of.owen_values(lambda masks: torch.zeros(3), s)
    with pytest.raises(ValueError, match="value_fn"):
        of.owen_values(lambda masks: torch.zeros(masks.shape[0], 1), s)


def test_value_fn_returning_nan_is_refused():
    s = of.CoalitionStructure([[0, 1], [2]])

    def v(masks):
        out = masks.sum(1).double()
        out[2] = float("nan")
        return out

    with pytest.raises(ValueError, match=r"NaN or infinite values for coalitions \[2\]"):
        of.owen_values(v, s)


def test_value_fn_must_be_callable():
    with pytest.raises(ValueError, match="value_fn: expected a callable"):
        of.owen_values([1.0, 2.0], of.CoalitionStructure([[0]]))


def test_structure_must_be_a_coalition_structure():
    with pytest.raises(ValueError, match="structure: expected a CoalitionStructure"):
        of.exact_plan([[0, 1], [2]])


def test_exact_plan_too_large_points_to_sampling():
    with pytest.raises(ValueError, match="method='sampled'"):
        of.exact_plan(of.CoalitionStructure.from_sizes([30, 30]))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_permutations_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="num_permutations"):
        of.sampled_plan(of.CoalitionStructure([[0, 1]]), bad)


def test_unknown_method_and_backend_are_named():
    s = of.CoalitionStructure([[0, 1]])
    with pytest.raises(ValueError, match="method: expected 'exact', 'sampled' or 'auto'"):
        of.owen_values(lambda m: m.sum(1).double(), s, method="kernelshap")
    with pytest.raises(ValueError, match="backend: expected one of"):
        of.owen_from_values(of.exact_plan(s), torch.zeros(4), backend="numba")


def test_budget_must_be_at_least_two():
    with pytest.raises(ValueError, match="budget"):
        of.make_plan(of.CoalitionStructure([[0, 1]]), "auto", budget=1)


def test_owen_from_values_checks_the_values_shape():
    plan = of.exact_plan(of.CoalitionStructure([[0, 1], [2]]))
    with pytest.raises(ValueError, match=r"values: expected shape \(8,\) or \(B, 8\)"):
        of.owen_from_values(plan, torch.zeros(7))
    batch = of.PlanBatch([plan, plan])
    with pytest.raises(ValueError, match=r"values: expected shape \(16,\) for a PlanBatch"):
        of.owen_from_values(batch, torch.zeros(2, 8))


def test_owen_from_values_checks_every_new_shape_after_a_good_call():
    """Repeated calls skip the checks for a shape already seen (a runner is kept on the plan); a new shape,
    good or bad, is checked again."""
    plan = of.exact_plan(of.CoalitionStructure([[0, 1], [2]]))
    values = torch.randn(5, 8, dtype=torch.float64)
    first = of.owen_from_values(plan, values)
    torch.testing.assert_close(of.owen_from_values(plan, values), first)
    torch.testing.assert_close(of.owen_from_values(plan, values[:2].clone()), first[:2])
    torch.testing.assert_close(of.owen_from_values(plan, values.float()), first.float())
    for bad in (torch.zeros(5, 7), torch.zeros(2, 5, 8)):
        with pytest.raises(ValueError, match=r"values: expected shape \(8,\) or \(B, 8\)"):
            of.owen_from_values(plan, bad)


def test_backend_on_the_wrong_device_is_refused():
    plan = of.exact_plan(of.CoalitionStructure([[0, 1]]))
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        of.owen_from_values(plan, torch.zeros(4), backend="cuda")


def test_plan_batch_refuses_non_plans():
    with pytest.raises(ValueError, match=r"plans\[1\]: expected a CoalitionPlan"):
        of.PlanBatch([of.exact_plan(of.CoalitionStructure([[0]])), "plan"])
