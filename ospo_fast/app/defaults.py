"""The application layer's defaults (``ospo-fast`` runs, the main job, comparisons, the warm starts), apart from
the library's (:mod:`ospo_fast.defaults`): what the shipped job chose, not what the library assumes."""

from __future__ import annotations

#: The supervised warm start to the answer format (:func:`ospo_fast.app.warm_start.supervised_warm_start`), also the
#: tiny policy's warm-start learning rate.
WARM_START_STEPS = 100
WARM_START_LR = 1e-3

#: The task of a run (``--task``).
TASK = "default"
#: Validation every this many steps (RunSettings).
EVAL_EVERY = 25
#: The tiny policy's warm start: steps, and extra pseudo-requests that teach it to copy text.
TINY_WARM_START_STEPS = 400
TINY_WARM_START_EXTRA = 4000
#: A pretrained policy's warm start on the credit task (it copies text but must learn the hint format).
CREDIT_WARM_START_STEPS = 12
#: A pretrained policy's warm-start learning rate.
PRETRAINED_WARM_START_LR = 5e-5
#: The RL learning rate the tiny policy needs (the ``--lr`` help text).
TINY_LEARNING_RATE = 5e-5

#: ``ospo-fast train`` with no arguments (the main job), chosen to finish within 15 minutes on 2 CPU cores,
#: install included, with SmolLM2-135M-Instruct (see README.md for the measurements).
MAIN_JOB_STEPS = 24
MAIN_JOB_GROUP_SIZE = 6
MAIN_JOB_LEARNING_RATE = 2e-5
MAIN_JOB_MAX_NEW_TOKENS = 32
MAIN_JOB_TEMPERATURE = 0.8
MAIN_JOB_EVAL_EVERY = 8
MAIN_JOB_SAVE_STEPS = 8
#: The main job trains under bf16 autocast (about 1.6x faster on a CPU with AMX, and on GPUs).
MAIN_JOB_BF16 = True

#: ``ospo-fast compare``: its seeds and run folder.
COMPARE_SEEDS = (0, 1, 2)
COMPARE_OUTPUT_DIR = "runs/compare"
