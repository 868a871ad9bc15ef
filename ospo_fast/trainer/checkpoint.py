"""A run folder's files: the checkpoint (written atomically, read with ``weights_only=True``), the random
generators' states it holds, and ``metrics.jsonl`` (appended one flushed line at a time)."""

from __future__ import annotations

import json
import os
import pickle
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .config import OSPOConfig

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
#: The keys of a checkpoint written by :meth:`OSPOTrainer.save_checkpoint`.
CHECKPOINT_KEYS = ("step", "config", "model", "optimizer", "scheduler", "data_rng", "order", "rng", "attributor")
#: Config fields a resumed run may change: where and how long it runs, how often it saves, how it shows
#: progress, and memory or implementation knobs that leave the optimisation itself as it was.
RESUME_MAY_DIFFER = ("output_dir", "max_steps", "save_steps", "progress", "micro_batch_size", "loss_backend")


def read_checkpoint(path, map_location=None, mmap: bool = False) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True`` (tensors and plain data only, so a file
    from elsewhere cannot run code). A missing, empty, truncated, foreign or incomplete file raises an error
    naming the file and what was expected. ``mmap=True`` reads the config without reading the weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}; run without --resume first")
    expected = ("expected a checkpoint written by OSPOTrainer.save_checkpoint "
                f"(a dict with keys {list(CHECKPOINT_KEYS)})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[-1].strip() if str(e).strip() else "not a torch checkpoint"
        raise ValueError(f"{path}: holds something other than tensors and plain data, or is not a torch file "
                         f"({reason}); {expected}") from None
    except (EOFError, RuntimeError, OSError) as e:
        size = path.stat().st_size
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: cannot be read ({size} bytes: empty or truncated?): {reason}; {expected}") from None
    if not isinstance(state, dict) or not set(CHECKPOINT_KEYS) <= set(state):
        missing = sorted(set(CHECKPOINT_KEYS) - set(state)) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: incomplete checkpoint (missing {missing}); {expected}")
    return state


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a crash mid-write leaves the previous file whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def resume_conflicts(saved: dict, given: dict) -> list[tuple[str, object, object]]:
    """(field, saved value, given value) for every config field that shapes the run and differs."""
    return [(name, saved.get(name), value) for name, value in given.items()
            if name not in RESUME_MAY_DIFFER and saved.get(name) != value]


def check_resume_config(path, saved: dict, config: OSPOConfig) -> None:
    """Raises naming the first field where ``config`` would change the run saved at ``path``."""
    conflicts = resume_conflicts(saved, asdict(config))
    if conflicts:
        name, old, new = conflicts[0]
        raise ValueError(f"config.{name}: the run at {path} was saved with {name}={old!r}, this trainer has "
                         f"{new!r}; resume with the saved value (only {', '.join(RESUME_MAY_DIFFER)} may differ)")


# ----------------------------------------------------------------------------------------------------
# The global random generators


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """The global generators' states as tensors and plain data, so checkpoints load with weights_only=True."""
    legacy = np.random.get_state(legacy=False)
    numpy_state = {**legacy, "state": {"key": legacy["state"]["key"].tolist(), "pos": int(legacy["state"]["pos"])}}
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restores what :func:`rng_states` returned."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl


def append_json_line(path: Path, record: dict) -> None:
    """Appends one JSON line in a single write, flushed to disk, so a crash tears at most the last line."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file. A torn last line (a crash mid-append) is dropped; a damaged line
    anywhere else is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):  # no newline after it: the write that ended here did not finish
                break
            raise ValueError(f"{path}: line {number} is not a JSON object ({line[:80]!r}); expected one JSON "
                             "record per line")
        records.append(record)
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps the metric lines of steps up to ``last_step`` (a resumed run rewrites the later ones) and drops
    a torn last line, so the next append starts on a line of its own."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != path.read_text():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
