"""OwenAttributor: segmentation, coalition plans, batched evaluation and Owen aggregation in one call.

    attr = OwenAttributor(reward, segmenter=Segmenter(), method="auto", budget=64, seed=0)
    out = attr(texts, owners)          # out.segmentations, out.phi (a float tensor per text), out.num_evaluations
    out[0].to_html()                   # the first response, each segment coloured by its Owen value
    ospo_fast.credit_on_tokens(out, tokenizer).credit   # each segment's value spread over the tokenizer's tokens

``reward`` is either a :class:`~ospo_fast.rewards.DenseRetrievalReward` (evaluated with one packed encoder
forward) or any text reward ``reward(texts, owners) -> float [N]`` (evaluated with one call).
"""

from __future__ import annotations

import html
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from . import defaults, dispatch
from .evaluate import (
    CoalitionBatch,
    EncoderCoalitionEvaluator,
    check_packed_options,
    evaluate_text_reward,
    packed_support,
)
from .owen import owen_from_values
from .plans import MAX_EXACT_COALITIONS, CoalitionPlan, check_plan_options, make_plans
from .rewards.dense import DenseRetrievalReward
from .rewards.metrics import check_queries
from .segment import Segmentation, Segmenter


@dataclass
class Attribution:
    """One response's attribution: its segments, their Owen values and the coalition values behind them."""

    text: str
    owner: int
    segmentation: Segmentation
    plan: CoalitionPlan
    values: torch.Tensor  # float [C]: v of each coalition of plan.masks
    phi: torch.Tensor  # float [n]: Owen value of each segment

    @property
    def reward(self) -> float:
        """v(N): the reward of the response reduced to all its segments."""
        return float(self.values[self.plan.full_index]) if self.plan.num_players else float("nan")

    @property
    def baseline(self) -> float:
        """v(empty): the reward of the empty text."""
        return float(self.values[self.plan.empty_index])

    def table(self) -> str:
        """Segments with their union and Owen value, one per line."""
        rows = [f"{'union':>5}  {'Owen':>9}  segment"]
        for i, segment in enumerate(self.segmentation.segments):
            rows.append(f"{self.segmentation.structure.union_of[i]:>5}  {float(self.phi[i]):>9.4f}  {segment}")
        if self.plan.num_players:
            rows.append(f"v(N) = {self.reward:.4f}, v(empty) = {self.baseline:.4f}, "
                        f"sum of Owen values = {float(self.phi.sum()):.4f}")
        return "\n".join(rows)

    def to_html(self) -> str:
        """The response as HTML, each segment coloured by its Owen value (red raises the reward, blue lowers
        it; the strongest segment is fully saturated), with the value in a tooltip. Text outside every
        segment (tags, the think block, punctuation) is shown in grey."""
        scale = float(self.phi.abs().max()) if self.phi.numel() else 0.0
        parts, cursor = [], 0
        for i, (start, end) in enumerate(self.segmentation.spans):
            parts.append(_grey(self.text[cursor:start]))
            value = float(self.phi[i])
            alpha = abs(value) / scale if scale > 0 else 0.0
            colour = f"rgba(255, 13, 87, {alpha:.3f})" if value >= 0 else f"rgba(30, 136, 229, {alpha:.3f})"
            title = f"segment {i}, union {self.segmentation.structure.union_of[i]}: Owen value {value:+.4f}"
            parts.append(
                f'<span title="{html.escape(title)}" style="background:{colour};border-radius:3px;padding:1px 2px">'
                f"{html.escape(self.text[start:end])}<sub style=\"font-size:0.65em\">{value:+.3f}</sub></span>"
            )
            cursor = end
        parts.append(_grey(self.text[cursor:]))
        header = (
            f'<div style="font-family:sans-serif;font-size:0.8em;color:#555">reward v(N) = {self.reward:.4f}, '
            f"v(empty) = {self.baseline:.4f}, {self.plan.num_coalitions} coalitions ({self.plan.method})</div>"
            if self.plan.num_players
            else ""
        )
        return f'<div style="font-family:monospace;line-height:1.9;margin:0.5em 0">{header}{"".join(parts)}</div>'


def _grey(text: str) -> str:
    return f'<span style="color:#999">{html.escape(text)}</span>' if text else ""


@dataclass
class Attributions:
    """The attributions of a batch of responses (a sequence of :class:`Attribution`).

    ``num_evaluations`` counts the reward evaluations actually run for the batch (sequences embedded, or
    distinct (owner, text) pairs scored): duplicates are evaluated once. ``timings`` holds seconds per stage.
    """

    items: list[Attribution]
    num_evaluations: int
    timings: dict = field(default_factory=dict)

    @property
    def segmentations(self) -> list[Segmentation]:
        return [a.segmentation for a in self.items]

    @property
    def phi(self) -> list[torch.Tensor]:
        return [a.phi for a in self.items]

    @property
    def num_coalitions(self) -> int:
        """Coalitions of all responses together, before duplicates were collapsed."""
        return sum(a.plan.num_coalitions for a in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> Attribution:
        return self.items[j]

    def __iter__(self):
        return iter(self.items)

    def to_html(self) -> str:
        return "\n".join(a.to_html() for a in self.items)


class OwenAttributor:
    """Attributes rewards of responses to their segments by Owen values, a whole batch at a time.

    Args:
        reward: a :class:`~ospo_fast.rewards.DenseRetrievalReward` or any ``reward(texts, owners) -> float [N]``.
        segmenter: text -> :class:`Segmentation` (default :class:`Segmenter`).
        method: "exact", "sampled" or "auto" (exact when it needs at most ``budget`` coalitions).
        budget: coalitions per response for "auto".
        num_permutations: orders for "sampled" (default 64; for "auto" beyond the budget, as many as fit).
        seed: seeds the attributor's random generator (numpy PCG64), once. Every call draws fresh orders
            for its sampled plans from it, so the estimates of successive calls are independent and their
            mean converges to the Owen value; a new attributor with the same seed repeats the same sequence
            of calls exactly. :meth:`state_dict` / :meth:`load_state_dict` save and restore the generator,
            so that a resumed training run continues the sequence. Exact plans involve no randomness.
        antithetic: sampled plans pair each order with its reverse.
        backend: Owen aggregation backend (see :func:`ospo_fast.owen_from_values`).
        evaluator: "auto" (packed encoder forward for a DenseRetrievalReward over a BERT-family encoder,
            else one text call; a DenseRetrievalReward the packed forward cannot run falls back to the
            text call with a warning), "packed" or "text".
        attention: attention backend of the packed forward ("auto", "flash", "sdpa").
        encoder_dtype: matmul precision of the packed forward (None: float32 on CPU, bfloat16 on CUDA;
            torch.float32, torch.bfloat16 or torch.float16, or its name). ``attention`` and ``encoder_dtype``
            given explicitly are honoured or refused: an unsupported value, or one the evaluator cannot use
            (a text reward, ``evaluator="text"``), raises.
        synchronize: on CUDA, wait for the device before returning, so that ``timings`` include its work.
            Off by default: a call then never synchronises the host with the GPU (results stay on the device
            until read), and the "evaluate" and "aggregate" timings measure the host's share only.
        max_exact_coalitions: the most coalitions an exact plan may have (:data:`~ospo_fast.plans.MAX_EXACT_COALITIONS`
            by default); ``method="exact"`` on a bigger game raises, ``"auto"`` samples instead.
        pipeline: attribute a batch in this many groups of consecutive responses, one after the other
            (default 1: the whole batch at once). On a GPU nothing waits for the device, so the host
            segments and lays out one group while the GPU embeds the one before: more groups hide more of
            the host's work, at the price of more, smaller kernel launches. On the CPU nothing overlaps, and
            groups only cost. Results do not depend on it, to floating-point rounding.

    Thread-safe: threads may share one attributor. The packed forward's activation buffers and the phrase
    token cache are each used under a lock; everything else a call touches is its own (the random
    generator draws under numpy's own lock, so concurrent sampled calls draw in no fixed order).
    """

    def __init__(
        self,
        reward,
        segmenter: Callable[[str], Segmentation] | None = None,
        method: str = defaults.ATTRIBUTION_METHOD,
        budget: int = defaults.BUDGET,
        num_permutations: int | None = None,
        seed: int = defaults.SEED,
        antithetic: bool = True,
        backend: str = "auto",
        evaluator: str = "auto",
        attention: str = "auto",
        encoder_dtype: torch.dtype | None = None,
        synchronize: bool = False,
        pipeline: int = 1,
        max_exact_coalitions: int = MAX_EXACT_COALITIONS,
    ):
        if not callable(reward):
            raise ValueError(f"reward: expected a callable reward(texts, owners), got {type(reward).__name__}")
        if evaluator not in ("auto", "packed", "text"):
            raise ValueError(f"evaluator: expected 'auto', 'packed' or 'text', got {evaluator!r}")
        if segmenter is not None and not callable(segmenter):
            raise ValueError(f"segmenter: expected a callable text -> Segmentation, got {type(segmenter).__name__}")
        dispatch.check_choice("aggregation", backend)  # the device is known at the first call
        self.reward = reward
        self.segmenter = segmenter if segmenter is not None else Segmenter()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.plan_options = dict(method=method, budget=budget, num_permutations=num_permutations, antithetic=antithetic,
                                 max_exact_coalitions=max_exact_coalitions)
        check_plan_options(**self.plan_options)  # once, here
        self.seed = int(seed)
        #: Draws the orders of every sampled plan (see ``seed``); its state is :meth:`state_dict`.
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        if isinstance(pipeline, bool) or not isinstance(pipeline, int) or pipeline < 1:
            raise ValueError(f"pipeline: expected an int >= 1 (groups of responses), got {pipeline!r}")
        self.backend = backend
        self.synchronize = synchronize
        self.pipeline = pipeline
        self.packed = self._packed_evaluator(reward, evaluator, attention, encoder_dtype)

    @staticmethod
    def _packed_evaluator(reward, evaluator: str, attention, encoder_dtype):
        """The packed evaluator, or None for the text path; :func:`~ospo_fast.evaluate.packed_support` says
        whether it can run for ``reward``. Options given explicitly (``evaluator="packed"``, ``attention``,
        ``encoder_dtype``) are honoured or raise; only the automatic choice falls back."""
        attention, encoder_dtype = check_packed_options(attention, encoder_dtype, "encoder_dtype")
        explicit = [f"{name}={value!r}" for name, value, default in
                    (("attention", attention, "auto"), ("encoder_dtype", encoder_dtype, None)) if value != default]
        if evaluator == "text":
            if explicit:
                raise ValueError(f"{explicit[0].split('=')[0]}: only the packed evaluator uses it, "
                                 "and evaluator='text'")
            return None
        reason = packed_support(reward)
        if reason is None:
            # Options the device cannot honour (flash attention on the CPU) are refused by the evaluator.
            return EncoderCoalitionEvaluator(reward, attention=attention, dtype=encoder_dtype)
        if evaluator == "packed" or explicit:
            asked = "evaluator='packed'" if evaluator == "packed" else explicit[0]
            raise ValueError(f"{asked}: the packed evaluator cannot run for this reward: {reason}")
        if isinstance(reward, DenseRetrievalReward):  # a text reward is expected on the text path
            warnings.warn(
                f"evaluator='auto': the packed encoder forward cannot run for this reward ({reason}); "
                "falling back to the slower text evaluation", RuntimeWarning, stacklevel=3,
            )
        return None

    def state_dict(self) -> dict:
        """The state of the random generator of the sampled plans: ``{"rng": <PCG64 state dict>}`` (plain
        Python ints and strings; picklable, ``torch.save``-able). Save it with a training checkpoint and
        give it to :meth:`load_state_dict` on resume to draw the same orders as an uninterrupted run."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore the random generator from :meth:`state_dict`'s output: the next call draws the orders that
        the saving attributor's next call would have drawn. ``state`` is checked before anything changes."""
        if not isinstance(state, dict) or set(state) != {"rng"}:
            got = f"a dict with keys {sorted(map(str, state))}" if isinstance(state, dict) else type(state).__name__
            raise ValueError("state: expected OwenAttributor.state_dict()'s output, a dict with the key 'rng', "
                             f"got {got}")
        rng_state = state["rng"]
        if not isinstance(rng_state, dict) or rng_state.get("bit_generator") != "PCG64":
            raise ValueError(
                f"state: expected state['rng'] to be a numpy PCG64 state (a dict with bit_generator='PCG64'), "
                f"got {rng_state!r:.200}"
            )
        bit_generator = np.random.PCG64()
        try:
            bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"state: state['rng'] is not a valid PCG64 state: {exc}") from None
        self.rng = np.random.Generator(bit_generator)

    def segment(self, texts: Sequence[str]) -> list[Segmentation]:
        """The segmentation of every text, each distinct text segmented once (a GRPO group often samples the
        same response more than once); repeated texts share one (immutable) :class:`Segmentation`."""
        distinct: dict[str, Segmentation] = {}
        for t in texts:
            if t not in distinct:
                distinct[t] = self.segmenter(t)
        return [distinct[t] for t in texts]

    def __call__(self, texts: Sequence[str], owners,
                 segmentations: Sequence[Segmentation] | None = None) -> Attributions:
        """Attribute ``texts[j]``'s reward against owner ``owners[j]`` to its segments.

        ``segmentations`` may be passed when the caller already segmented the texts.
        """
        owners = check_queries(texts, owners, getattr(self.reward, "num_owners", None))
        texts = list(texts)
        if segmentations is not None:
            _check_segmentations(segmentations, texts)
        timings = dict(segment=0.0, plan=0.0, evaluate=0.0, aggregate=0.0)
        items, evaluations = [], 0
        plan_of: dict = {}  # (text, structure) -> plan, for the whole call: a repeated text shares one draw
        for lo, hi in _groups(len(texts), self.pipeline):
            group_items, group_evaluations = self._attribute(
                texts[lo:hi], owners[lo:hi], None if segmentations is None else segmentations[lo:hi], timings, plan_of
            )
            items += group_items
            evaluations += group_evaluations
        if self.synchronize and items and items[0].phi.is_cuda:
            start = time.perf_counter()
            torch.cuda.synchronize()  # only for device-inclusive timings; the results need no sync
            timings["aggregate"] += time.perf_counter() - start
        timings["total"] = sum(timings.values())
        return Attributions(items=items, num_evaluations=evaluations, timings=timings)

    def _attribute(self, texts, owners, segmentations, timings: dict, plan_of: dict) -> tuple[list[Attribution], int]:
        """One group of responses: its attributions and reward evaluations; adds its seconds to ``timings``."""
        t0 = time.perf_counter()
        if segmentations is None:
            segmentations = self.segment(texts)
        t1 = time.perf_counter()
        plans = self._plans(segmentations, plan_of)
        coalitions = CoalitionBatch.build(segmentations, plans, owners)
        t2 = time.perf_counter()
        if self.packed is not None:
            values, evaluations = self.packed(coalitions)
        else:
            values, evaluations = evaluate_text_reward(self.reward, coalitions)
        t3 = time.perf_counter()
        phi = owen_from_values(coalitions.batch, values, backend=self.backend)
        items = [
            Attribution(text=t, owner=int(o), segmentation=sg, plan=p, values=v, phi=f)
            for t, o, sg, p, v, f in zip(
                texts, owners.tolist(), segmentations, plans, coalitions.batch.split_values(values),
                coalitions.batch.split(phi),
            )
        ]
        t4 = time.perf_counter()
        for stage, seconds in (("segment", t1 - t0), ("plan", t2 - t1), ("evaluate", t3 - t2), ("aggregate", t4 - t3)):
            timings[stage] += seconds
        return items, evaluations

    def _plans(self, segmentations: Sequence[Segmentation], plan_of: dict) -> list[CoalitionPlan]:
        """The plan of each response. A text not yet in ``plan_of`` (this call's plans so far) gets a new plan:
        sampled plans draw fresh orders from :attr:`rng`, for all new texts at once, in the order the texts
        first occur in the call (so groups of a pipelined call draw what one group would); identical texts
        share one plan, as :class:`CoalitionBatch` evaluates them once."""
        new: dict = {}
        for sg in segmentations:
            key = (sg.text, sg.structure)
            if key not in plan_of and key not in new:
                new[key] = sg.structure
        if new:
            plan_of.update(zip(new, make_plans(list(new.values()), **self.plan_options, rng=self.rng)))
        return [plan_of[(sg.text, sg.structure)] for sg in segmentations]


def _check_segmentations(segmentations, texts: list[str]) -> None:
    """Each ``segmentations[j]`` is a Segmentation of ``texts[j]`` (its spans index that very text)."""
    if isinstance(segmentations, (str, bytes)) or not isinstance(segmentations, Sequence):
        raise ValueError(f"segmentations: expected a list of Segmentation, got {type(segmentations).__name__}")
    if len(segmentations) != len(texts):
        raise ValueError(f"segmentations: expected {len(texts)}, one per text, got {len(segmentations)}")
    for j, (sg, text) in enumerate(zip(segmentations, texts)):
        if not isinstance(sg, Segmentation):
            raise ValueError(f"segmentations[{j}]: expected a Segmentation, got {type(sg).__name__}")
        if sg.text != text:
            raise ValueError(
                f"segmentations[{j}]: is the segmentation of another text ({sg.text[:60]!r}), "
                f"not of texts[{j}] ({text[:60]!r})"
            )


def _groups(n: int, count: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges cutting ``n`` items into at most ``count`` consecutive groups of near-equal size."""
    count = min(count, n)
    bounds = [round(i * n / count) for i in range(count + 1)] if count else []
    return list(zip(bounds[:-1], bounds[1:]))
