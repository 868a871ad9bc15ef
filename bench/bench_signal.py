"""The learning signal, measured directly: what one update does, per advantage variant, on the same batches.

From one policy snapshot (the pretrained policy after the task's warm start), ``--batches`` batches are sampled
(prompts x group size completions each). On every batch, each variant's policy gradient ``g_v`` is computed on
the *same* completions, rewards and Owen values (only the per-token advantages differ), restricted to the
parameters of the last ``--blocks`` decoder blocks. Measures, per batch, paired across variants:

* ``cosine``: the cosine of ``g_v(b)`` with the mean GRPO gradient of the *other* batches, an estimate of the
  true policy gradient that is independent of batch b;
* on a credit task, where the right answer is known: ``margin``, the first-order change of the held-out margin
  ``log p(oracle) - log p(anti-oracle)`` (request + true hints vs request + decoys, teacher-forced, mean over the
  validation prompts) after an SGD step of unit size along ``-g_v``, i.e. ``-grad(margin) . g_v``; and
  ``margin_cosine``, the cosine of ``-g_v`` with ``grad(margin)`` (scale-free).

Writes (and merges into) a JSON file::

    {TASK: {"variants": {VARIANT: {MEASURE: {"mean", "ci95"}}}, "minus_grpo": {VARIANT: {MEASURE: {...}}},
            "batches": N, "settings": {...}, "seconds": s}}

Run (about 30-60 s a batch with SmolLM2-135M on 2 CPU cores)::

    python bench/bench_signal.py --task credit --batches 50 --output docs/results/signal.json
    python bench/bench_signal.py --task hm --max-samples 300 --batches 50 --output docs/results/signal.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ospo_fast import Redistribution, attribute_completions, group_advantages, grpo_loss, token_advantages
from ospo_fast.app import defaults as app_defaults
from ospo_fast.app.experiment import RunSettings, load_task, make_policy, training_items, warm_start
from ospo_fast.app.stats import t_interval
from ospo_fast.credit import CompletionCredit, excess_credit, spread_credit
from ospo_fast.policy import prompt_text
from ospo_fast.trainer import OSPOConfig, OSPOTrainer

#: Variant -> (redistribution mode or None for GRPO, shuffled credit).
VARIANTS = {
    "grpo": (None, False),
    "ospo": ("proportional", False),
    "signed": ("signed", False),
    "shuffled": ("proportional", True),
    "shuffled-signed": ("signed", True),
}


def shuffled(credit: CompletionCredit, rng: np.random.Generator) -> CompletionCredit:
    """The same credit values permuted among each response's segments (the control)."""
    excess, worth = [], []
    for a, w in zip(credit.attributions.items, credit.worth):
        order = torch.from_numpy(rng.permutation(w.numel()))
        excess.append(excess_credit(a.plan, a.values, a.phi).float()[order])
        worth.append(w[order])
    return replace(credit, credit=spread_credit(excess, credit.token_player), worth=worth)


def trained_parameters(model, blocks: int) -> list[torch.nn.Parameter]:
    """The parameters of the last ``blocks`` decoder blocks (and the final norm); the rest are frozen."""
    layers = model.model.layers
    keep = {id(p) for layer in layers[len(layers) - blocks:] for p in layer.parameters()}
    keep |= {id(p) for p in model.model.norm.parameters()}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            params.append(p)
    return params


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter], retain: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain)
    return torch.cat([g.reshape(-1) for g in grads]).float()


def sequence_logps(model, tokenizer, prompts: list, answers: list[str], bf16: bool) -> torch.Tensor:
    """Teacher-forced log-probability of each answer (and the end of sequence) after its prompt: float [P]."""
    rows = []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + a])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        rows.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(a)[:, None]).sum())
    return torch.stack(rows)


def margin_gradient(model, tokenizer, task, params, bf16: bool) -> tuple[torch.Tensor, float]:
    """grad of the mean held-out margin log p(oracle) - log p(anti-oracle), and the margin itself."""
    from ospo_fast.app.credit import credit_answer

    prompts = [s.prompt for s in task.samples]
    oracle = [credit_answer(s.query, s.info["true_hints"]) for s in task.samples]
    anti = [credit_answer(s.query, s.info["decoy_hints"]) for s in task.samples]
    margin = (sequence_logps(model, tokenizer, prompts, oracle, bf16)
              - sequence_logps(model, tokenizer, prompts, anti, bf16)).mean()
    return flat_grad(margin, params, retain=False), float(margin)


def summary(values: dict[str, list[float]]) -> dict:
    return {k: {"mean": t_interval(v)["mean"], "ci95": t_interval(v)["ci95"]} for k, v in values.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="credit", help="a task of ospo-fast train (credit, credit-hm, hm, default)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    for name in ("hm-articles", "hm-customers", "hm-transactions"):
        p.add_argument(f"--{name}")
    p.add_argument("--max-samples", type=int)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    p.add_argument("--group-size", type=int, default=app_defaults.MAIN_JOB_GROUP_SIZE)
    p.add_argument("--max-new-tokens", type=int, default=app_defaults.MAIN_JOB_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=app_defaults.MAIN_JOB_TEMPERATURE)
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks whose gradient is measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--output", default="docs/results/signal.json")
    args = p.parse_args(argv)
    if "grpo" not in args.variants:
        args.variants = ["grpo"] + args.variants  # the reference of every paired difference
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    hm = dict(hm_articles=args.hm_articles, hm_customers=args.hm_customers, hm_transactions=args.hm_transactions)
    settings = RunSettings(task=args.task, model=args.model, max_samples=args.max_samples,
                           **{k: v for k, v in hm.items() if v})
    train_task, val_task, test_task = load_task(settings, seed=args.seed)
    items = training_items(train_task, val_task, test_task)
    model, tokenizer = make_policy(settings, train_task, items, seed=args.seed)
    bf16 = True
    if settings.warm_start_steps_or_default() > 0:
        warm_start(model, tokenizer, settings, train_task, args.seed, True, items, bf16)
    from ospo_fast.app.evaluation import retrievers

    reward = retrievers(train_task, fit_items=items)["dense"]
    config = OSPOConfig(output_dir="/tmp/ospo_signal", group_size=args.group_size, prompts_per_step=args.prompts,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, bf16=bf16,
                        progress=False)
    trainer = OSPOTrainer(model, tokenizer, reward, train_task.prompts, train_task.owners, config)
    params = trained_parameters(model, args.blocks)
    credit_task = settings.is_credit_task
    margin_grad, margin = margin_gradient(model, tokenizer, val_task, params, bf16) if credit_task else (None, None)

    grads: dict[str, list[torch.Tensor]] = {v: [] for v in args.variants}
    stats = dict(rewards=[], reward_std=[], segments=[])
    for b in range(args.batches):
        prompt_ids = trainer._next_prompts()
        torch.manual_seed(args.seed * 100_003 + b)
        rollout = trainer.generate(prompt_ids)
        owners = [train_task.owners[i] for i in prompt_ids for _ in range(args.group_size)]
        credit = attribute_completions(tokenizer, rollout.completion_ids, trainer.attributor, owners,
                                       keep=rollout.completion_mask)
        rewards = credit.full_values.float()
        advantages = group_advantages(rewards, args.group_size)
        stats["rewards"].append(float(rewards.mean()))
        stats["reward_std"].append(float(rewards.view(-1, args.group_size).std(1).mean()))
        stats["segments"].append(float(np.mean([a.segmentation.num_players for a in credit.attributions])))
        mask = rollout.completion_mask
        model.train()
        logits = trainer._completion_logits(model, rollout, slice(0, mask.shape[0]))
        rng = np.random.default_rng([args.seed, b])
        for k, variant in enumerate(args.variants):
            mode, is_shuffled = VARIANTS[variant]
            if mode is None:
                adv = token_advantages(advantages, mask, None)
            else:
                used = shuffled(credit, rng) if is_shuffled else credit
                adv = token_advantages(advantages, mask, used, Redistribution(mode=mode), groups=args.group_size)
            loss, _ = grpo_loss(logits, rollout.completion_ids, adv, mask, loss_type="grpo", backend="torch",
                                temperature=args.temperature)
            grads[variant].append(flat_grad(loss, params, retain=k + 1 < len(args.variants)).half())
        print(f"batch {b + 1}/{args.batches}: reward {stats['rewards'][-1]:.3f} "
              f"(in-group std {stats['reward_std'][-1]:.3f}), {stats['segments'][-1]:.1f} segments per answer, "
              f"{time.perf_counter() - start:.0f} s", flush=True)

    grpo_sum = torch.stack([g.float() for g in grads["grpo"]]).sum(0)
    measures: dict[str, dict[str, list[float]]] = {v: {"cosine": []} for v in args.variants}
    for variant in args.variants:
        for b, g in enumerate(grads[variant]):
            g = g.float()
            reference = (grpo_sum - grads["grpo"][b].float()) / max(args.batches - 1, 1)
            measures[variant]["cosine"].append(float(torch.nn.functional.cosine_similarity(g, reference, dim=0)))
            if credit_task:
                measures[variant].setdefault("margin", []).append(float(-(margin_grad @ g)))
                measures[variant].setdefault("margin_cosine", []).append(
                    float(torch.nn.functional.cosine_similarity(-g, margin_grad, dim=0)))
    result = {
        "variants": {v: summary(measures[v]) for v in args.variants},
        "minus_grpo": {v: summary({m: list(np.subtract(measures[v][m], measures["grpo"][m])) for m in measures[v]})
                       for v in args.variants if v != "grpo"},
        "batches": args.batches,
        "policy": {"mean reward": float(np.mean(stats["rewards"])),
                   "mean in-group reward std": float(np.mean(stats["reward_std"])),
                   "segments per answer": float(np.mean(stats["segments"])),
                   **({"held-out margin": margin} if credit_task else {})},
        "settings": {**vars(args), "config": {k: v for k, v in asdict(config).items() if k != "output_dir"},
                     "measured parameters": f"last {args.blocks} decoder blocks and the final norm "
                                            f"({sum(p.numel() for p in params)} parameters)"},
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.output)
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged[args.task] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    for variant in args.variants:
        line = ", ".join(f"{m} {s['mean']:+.4f} [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}]"
                         for m, s in result["variants"][variant].items())
        print(f"{variant:>16}: {line}")
    return result


if __name__ == "__main__":
    main()
