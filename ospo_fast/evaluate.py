"""Coalition-masked evaluation: the value of every coalition of every response of a batch, in one call.

The value of coalition S of a response is the reward of ``coalition_text(sg, S)``. Two kinds of reward:

* **text rewards** — any ``reward(texts, owners) -> float [N]`` (BM25, a Python metric, an LLM judge): all
  distinct ``(owner, coalition text)`` pairs of the batch are built and scored in one call;
* **encoder rewards** — :class:`~ospo_fast.rewards.DenseRetrievalReward`: each distinct response is tokenised
  once by the encoder's tokenizer; each coalition keeps the tokens of its segments and of the text between
  adjacent kept segments (the tokens of its coalition text); the kept tokens of all
  coalitions are packed into one variable-length batch (``cu_seqlens``, no padding) and embedded in one
  forward; pooling, scoring against the pool and the metric run on the device for all coalitions at once.

Duplicates are evaluated once: responses with the same text share their coalitions, and the empty
coalition (``[CLS] [SEP]`` for an encoder) is embedded once for the whole batch.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import _extension
from ._device import to_device_all
from .plans import CoalitionPlan, PlanBatch
from .rewards.encoder import tokenizable
from .segment import Segmentation, coalition_texts
from .structure import MAX_PLAYERS

# ----------------------------------------------------------------------------------------------------
# Which coalitions of which responses: the batch layout shared by both kinds of reward.


@dataclass
class CoalitionBatch:
    """The coalitions of a batch of responses, with duplicate responses collapsed.

    ``responses`` index ``unique`` (distinct response texts); ``plans[u]`` is the plan of unique text ``u``.
    Values are laid out per *response* (``PlanBatch(plans of the responses)``), so each response keeps its
    own owner; ``value_source[k]`` says which (unique text, coalition) row value ``k`` comes from.
    """

    segmentations: list[Segmentation]  # per unique text
    plans: list[CoalitionPlan]  # per unique text
    unique_of_response: np.ndarray  # int64 [R]
    owners: np.ndarray  # int64 [R]
    batch: PlanBatch  # over the responses

    @classmethod
    def build(cls, segmentations: Sequence[Segmentation], plans: Sequence[CoalitionPlan], owners) -> "CoalitionBatch":
        key_of: dict[str, int] = {}
        unique_of_response = np.empty(len(segmentations), dtype=np.int64)
        seg_u, plan_u = [], []
        for r, (sg, plan) in enumerate(zip(segmentations, plans)):
            u = key_of.get(sg.text)
            if u is None:
                u = key_of[sg.text] = len(seg_u)
                seg_u.append(sg)
                plan_u.append(plan)
            unique_of_response[r] = u
        owners = np.asarray(owners, dtype=np.int64)
        return cls(seg_u, plan_u, unique_of_response, owners, PlanBatch([plan_u[u] for u in unique_of_response]))

    @property
    def num_responses(self) -> int:
        return len(self.unique_of_response)

    def value_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """For each value of the response-level batch: (unique text, coalition index in its plan)."""
        sizes = np.diff(self.batch.value_offsets)
        response = np.repeat(np.arange(self.num_responses), sizes)
        coalition = np.arange(self.batch.num_values) - self.batch.value_offsets[:-1][response]
        return self.unique_of_response[response], coalition

    def value_owners(self) -> np.ndarray:
        return np.repeat(self.owners, np.diff(self.batch.value_offsets))


# ----------------------------------------------------------------------------------------------------
# Text rewards


def evaluate_text_reward(reward: Callable, coalitions: CoalitionBatch) -> tuple[torch.Tensor, int]:
    """Values float64 ``[coalitions.batch.num_values]`` from one call of ``reward(texts, owners)``.

    Returns the values and the number of distinct (owner, text) pairs the reward scored.
    """
    texts_u = [coalition_texts(sg, plan.masks) for sg, plan in zip(coalitions.segmentations, coalitions.plans)]
    unique_rows, coalition = coalitions.value_rows()
    owners = coalitions.value_owners()
    index_of: dict[tuple[int, str], int] = {}
    query_texts, query_owners = [], []
    value_index = np.empty(len(owners), dtype=np.int64)
    for k, (u, c, o) in enumerate(zip(unique_rows.tolist(), coalition.tolist(), owners.tolist())):
        key = (o, texts_u[u][c])
        j = index_of.get(key)
        if j is None:
            j = index_of[key] = len(query_texts)
            query_texts.append(key[1])
            query_owners.append(o)
        value_index[k] = j
    if not query_texts:
        return torch.zeros(0, dtype=torch.float64), 0
    scores = _reward_values(reward, reward(query_texts, query_owners), len(query_texts))
    return scores[torch.from_numpy(value_index)], len(query_texts)


def _reward_values(reward: Callable, out, n: int) -> torch.Tensor:
    """A text reward's output for ``n`` texts as float64 ``[n]`` on the CPU; a ValueError naming the reward
    and what was expected when it is not ``n`` finite real numbers (a tensor, an array or a list)."""
    name = getattr(reward, "__name__", None) or type(reward).__name__
    expected = f"expected {n} finite real numbers (a float tensor, array or list of shape [{n}]), one per text"
    if isinstance(out, (str, bytes)):
        raise ValueError(f"reward {name}: returned a {type(out).__name__}; {expected}")
    try:
        values = torch.as_tensor(out)
    except (TypeError, ValueError, RuntimeError) as exc:  # None, strings, ragged lists
        raise ValueError(f"reward {name}: returned {_preview(out)}, not numbers ({exc}); {expected}") from None
    if values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"reward {name}: returned values of dtype {values.dtype}; {expected}")
    if values.dim() == 2 and values.shape[1] == 1:  # a column [n, 1], as a model head returns it
        values = values[:, 0]
    if tuple(values.shape) != (n,):
        raise ValueError(f"reward {name}: returned shape {tuple(values.shape)}; {expected}")
    values = values.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"reward {name}: returned NaN or infinite values for some coalition texts; {expected}")
    return values


def _preview(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------------
# Packing the kept tokens of every coalition into one variable-length batch


@dataclass
class PackedSequences:
    """A variable-length batch: sequence ``s`` is ``input_ids[cu_seqlens[s]:cu_seqlens[s+1]]``.

    ``input_ids``, ``position_ids``: int64 ``[total]``; ``cu_seqlens``: int32 ``[S + 1]`` on the device;
    ``lengths``: the same lengths on the host (numpy), so no device read is needed to lay out attention.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: np.ndarray
    _runs: list | None = field(default=None, init=False, repr=False, compare=False)  # see runs()

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def runs(self) -> list[tuple[int, int, int, int]]:
        """Maximal runs of consecutive sequences of equal length: (first token, first sequence, sequences,
        length). A run's tokens are a ``[sequences, length]`` block, so per-sequence work on it needs no
        padding and no index: a view. Computed once per batch (the forward and the pooling both use it)."""
        if self._runs is None:
            lengths = np.asarray(self.lengths, dtype=np.int64)
            first = np.flatnonzero(np.diff(lengths, prepend=-1))  # where the length changes
            counts = np.diff(first, append=len(lengths))
            run_lengths = lengths[first]
            tokens = np.cumsum(counts * run_lengths) - counts * run_lengths
            self._runs = list(zip(tokens.tolist(), first.tolist(), counts.tolist(), run_lengths.tolist()))
        return self._runs


def pack_coalitions_reference(
    token_ids: torch.Tensor,
    token_need: torch.Tensor,
    text_offsets: torch.Tensor,
    seq_text: torch.Tensor,
    seq_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cls_id: int,
    sep_id: int,
    total_tokens: int,
) -> torch.Tensor:
    """Torch reference of the packing kernel (``ospo_fast/kernels/pack_coalitions.py``).

    token_ids: int64 ``[N]`` (tokens of all texts, concatenated); token_need: int64 ``[N]``, for each token
    the bit mask of the players that must all be kept for it to be kept (``1 << i`` for player i's tokens,
    ``(1 << i) | (1 << (i + 1))`` for the tokens of the text between players i and i + 1; 0 = never kept);
    text_offsets: int64 ``[U + 1]``; seq_text: int64 ``[S]`` (-1: a sequence with no text tokens);
    seq_keep: int64 ``[S]`` bit masks of the kept players (bit 63 is the sign bit); cu_seqlens: int64
    ``[S + 1]`` (each sequence holds ``[CLS] kept tokens [SEP]``, truncated to its length). A token is kept
    when ``need != 0 and keep & need == need``. Returns int64 ``[total_tokens]`` (``total_tokens ==
    cu_seqlens[-1]``, passed from the host).
    """
    device = token_ids.device
    out = torch.empty(total_tokens, dtype=torch.int64, device=device)
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    out[starts] = cls_id
    out[ends - 1] = sep_id
    # One row per (sequence, token of its text), in order.
    has_text = seq_text >= 0
    text = seq_text.clamp(min=0)
    first = torch.where(has_text, text_offsets[text], 0)
    count = torch.where(has_text, text_offsets[text + 1] - first, 0)
    seq = torch.repeat_interleave(torch.arange(seq_text.numel(), device=device), count)
    row_start = torch.cumsum(count, 0) - count
    token = first[seq] + torch.arange(seq.numel(), device=device) - row_start[seq]
    need = token_need[token]
    kept = (need != 0) & ((seq_keep[seq] & need) == need)
    # Rank of each kept token inside its sequence; those past the sequence's room were truncated.
    kept_so_far = torch.cumsum(kept.long(), 0)
    kept_before = torch.cat([kept_so_far.new_zeros(1), kept_so_far])[row_start]
    rank = kept_so_far - 1 - kept_before[seq]
    write = kept & (rank < (ends - starts - 2)[seq])
    out[starts[seq[write]] + 1 + rank[write]] = token_ids[token[write]]
    return out


def pack_coalitions(
    token_ids: torch.Tensor,
    token_need: torch.Tensor,
    text_offsets: torch.Tensor,
    seq_text: torch.Tensor,
    seq_keep: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cls_id: int,
    sep_id: int,
    total_tokens: int,
    max_text_tokens: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Packed ``[CLS] kept tokens [SEP]`` of every sequence (see :func:`pack_coalitions_reference`).

    ``backend``: "triton" (CUDA, or the CPU under TRITON_INTERPRET=1), "torch", or "auto" (triton on CUDA
    when installed, else torch). ``total_tokens``, ``max_text_tokens``: the packed size and the longest
    text's token count, known on the host.
    """
    use_triton = backend == "triton" or (
        backend == "auto" and token_ids.is_cuda and _extension.has_triton()
    )
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if not use_triton:
        return pack_coalitions_reference(
            token_ids, token_need, text_offsets, seq_text, seq_keep, cu_seqlens, cls_id, sep_id, total_tokens
        )
    from .kernels.pack_coalitions import pack_coalitions as triton_pack

    return triton_pack(
        token_ids, token_need, text_offsets, seq_text, seq_keep, cu_seqlens, cls_id, sep_id, total_tokens,
        max_text_tokens,
    )


# ----------------------------------------------------------------------------------------------------
# The encoder forward on a packed batch


#: Attention backends of the packed forward.
ATTENTIONS = ("auto", "flash", "sdpa")
#: Matmul precisions of the packed forward.
PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

def check_packed_options(attention, dtype, dtype_name: str = "dtype") -> tuple[str, torch.dtype | None]:
    """``(attention, dtype)`` of the packed forward after checking them; ``dtype`` may be given by name
    ("bfloat16" or "torch.bfloat16"). None stays None (the evaluator's default). ValueError naming the
    option (``dtype_name``: what the caller calls it) and its supported values otherwise."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
    names = [str(d).replace("torch.", "") for d in PACKED_DTYPES]
    if isinstance(dtype, str):
        by_name = dict(zip(names, PACKED_DTYPES))
        dtype = by_name.get(dtype.replace("torch.", ""), dtype)
    if dtype is not None and dtype not in PACKED_DTYPES:
        raise ValueError(
            f"{dtype_name}: the packed forward supports None (default), {', '.join(f'torch.{n}' for n in names)} "
            f"(or their names), got {dtype!r}"
        )
    return attention, dtype


_ACTIVATIONS = ("gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


def _activation_(x: torch.Tensor, name: str) -> torch.Tensor:
    """The encoder's hidden activation, in place (the largest activation is not copied again)."""
    if name in ("gelu", "gelu_python"):
        return torch.ops.aten.gelu_(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return torch.ops.aten.gelu_(x, approximate="tanh")
    if name == "relu":
        return x.relu_()
    raise ValueError(f"encoder: hidden_act {name!r} is not supported by the packed forward")


@functools.lru_cache(maxsize=None)
def _flash_varlen():
    """A varlen flash-attention function ``f(q, k, v, cu_q, cu_k, max_q, max_k)``: flash-attn's where
    installed, else PyTorch's own (``torch.nn.attention.varlen``, torch >= 2.9); None when neither exists.
    Looked up once: a failed import is not cached by Python and costs about 25 us per layer otherwise."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore

        return flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class PackedBertForward:
    """A BERT-family encoder run on packed variable-length sequences, with the model's own weights.

    Every linear layer works on the packed tokens ``[total, hidden]`` (no padding FLOPs; Q, K and V in one
    matmul; residual projections accumulate in place, see :meth:`_folded_layers`). Attention, never padded:
    in float32 on the CPU, the extension's varlen kernel (``csrc/varlen_attention.cpp``); on CUDA in
    fp16/bf16, flash-attn's varlen kernel where installed, else PyTorch's (torch >= 2.9); otherwise
    PyTorch's SDPA once per run of consecutive sequences of equal length, on a zero-copy view of the packed
    tokens (``attention="sdpa"`` forces this path). In reduced precision on CUDA, the embeddings' sum and
    LayerNorm, and each residual add, LayerNorm and cast to the matmuls' dtype, are one Triton kernel each
    (``ospo_fast/kernels/residual_layer_norm.py``).
    Gives the unmodified model's hidden states (tested to fp32 tolerance on the CPU, bf16 tolerance on CUDA).

    In float32 the activations live in buffers kept across calls (see :meth:`_buffer`), about
    ``intermediate + 3 * hidden`` floats per token of the largest batch; :meth:`release_buffers` frees them.
    Thread-safe: a lock serialises the forwards of one instance (they share those buffers and the folded
    weights built on first use); the returned hidden states are never a shared buffer.
    """

    SUPPORTED = ("bert",)

    def __init__(self, model, attention: str = "auto", dtype: torch.dtype = torch.float32):
        config = model.config
        if config.model_type not in self.SUPPORTED:
            raise ValueError(f"encoder: the packed forward supports {self.SUPPORTED}, got {config.model_type!r}")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("encoder: the packed forward needs absolute position embeddings")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"encoder: hidden_act {config.hidden_act!r} is not supported by the packed forward")
        device = next(model.parameters()).device
        if attention == "flash" and (device.type != "cuda" or dtype == torch.float32 or _flash_varlen() is None):
            raise ValueError(
                "attention='flash' needs flash-attn or torch >= 2.9 (torch.nn.attention.varlen), a CUDA device "
                f"and dtype torch.float16 or torch.bfloat16; got {device.type} and {dtype}. Supported attention "
                f"values: {ATTENTIONS}"
            )
        self.model = model
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.act = config.hidden_act
        self.attention = attention
        self.dtype = dtype
        self._layers = None
        self._buffers: dict[str, torch.Tensor] = {}  # see _buffer
        self._lock = threading.Lock()  # one forward at a time: it writes _buffers (and _layers once)

    def _folded_layers(self) -> list[dict]:
        """The layers' weights rearranged once for fewer passes over the activations (exact algebra):

        * Q, K and V stacked into one projection;
        * the biases of the two residual projections (attention output, FFN down) moved out of the matmuls:
          each is added by the LayerNorm before it (its beta) to the residual stream, and subtracted from
          what that stream feeds (``b_qkv - W_qkv b_o``, ``b_up - W_up b_down``), so the residual matmuls
          accumulate into the stream in place, with no bias copy and no separate residual add.
        """
        if self._layers is None:
            layers = list(self.model.encoder.layer)
            pending = [layer.attention.output.dense.bias.detach() for layer in layers] + [None]
            self._layers = []
            for i, layer in enumerate(layers):
                sa, out, ffn = layer.attention.self, layer.attention.output, layer.output
                w_qkv = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]).detach()
                b_qkv = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]).detach()
                b_down = ffn.dense.bias.detach()
                up = layer.intermediate.dense
                after_ffn = ffn.LayerNorm.bias.detach()
                self._layers.append(dict(
                    w_qkv=w_qkv,
                    b_qkv=b_qkv - w_qkv @ pending[i],
                    w_out_t=out.dense.weight.detach().t(),
                    ln_attention=(out.LayerNorm.weight.detach(), out.LayerNorm.bias.detach() + b_down,
                                  out.LayerNorm.eps),
                    w_up_t=up.weight.detach().t(),
                    b_up=up.bias.detach() - up.weight.detach() @ b_down,
                    w_down_t=ffn.dense.weight.detach().t(),
                    ln_output=(ffn.LayerNorm.weight.detach(),
                               after_ffn + pending[i + 1] if pending[i + 1] is not None else after_ffn,
                               ffn.LayerNorm.eps),
                ))
            emb_ln = self.model.embeddings.LayerNorm
            self._embedding_ln = (emb_ln.weight.detach(), emb_ln.bias.detach() + pending[0], emb_ln.eps)
            if self.dtype != torch.float32:
                # Reduced precision: the matmuls' weights and biases are cast once, here, not on every call
                # as autocast would (detached weights miss its cast cache); LayerNorms and the residual
                # stream stay float32, as under autocast.
                for layer in self._layers:
                    for name in ("w_qkv", "b_qkv", "w_out_t", "w_up_t", "b_up", "w_down_t"):
                        layer[name] = layer[name].to(self.dtype)
        return self._layers

    def _cpu_kernels(self, device: torch.device) -> bool:
        """Whether the extension's C++ row kernels run this forward: float32 on the CPU, where built."""
        return device.type == "cpu" and self.dtype == torch.float32 and _extension.has_cpp()

    def _attention_kernel(self, device: torch.device) -> bool:
        """Whether attention runs in the extension's C++ varlen kernel."""
        return self.attention == "auto" and self._cpu_kernels(device)

    def _attend(self, q, k, v, packed: PackedSequences, qkv_bias=None) -> torch.Tensor:
        """q, k, v: [total, heads, head_dim] -> [total, heads, head_dim]; ``qkv_bias`` (the C++ kernel only) is
        added to q, k and v inside it."""
        flash = _flash_varlen() if q.is_cuda and self.attention in ("auto", "flash") else None
        if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            cu = packed.cu_seqlens
            return flash(q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen)
        if self._attention_kernel(q.device):
            # The C++ kernel: one task per sequence, no per-length calls, output written in place.
            out = self._buffer("context", q.shape[0], q.shape[1] * q.shape[2], q).view(q.shape)
            torch.ops.ospo_fast.varlen_attention(
                q, k, v, packed.cu_seqlens, packed.max_seqlen, self.head_dim**-0.5, out, qkv_bias
            )
            return out
        out = torch.empty_like(q)
        for start, _, count, length in packed.runs():
            end = start + count * length

            def view(x):  # [count * length, h, d] -> [count, h, length, d], no copy
                return x[start:end].view(count, length, self.heads, self.head_dim).transpose(1, 2)

            o = F.scaled_dot_product_attention(view(q), view(k), view(v))
            out[start:end] = o.transpose(1, 2).reshape(count * length, self.heads, self.head_dim)
        return out

    @torch.inference_mode()
    def hidden_states(self, packed: PackedSequences) -> torch.Tensor:
        """Last hidden states float ``[total, hidden]`` of the packed tokens."""
        with self._lock:
            return self._hidden_states(packed)

    def _hidden_states(self, packed: PackedSequences) -> torch.Tensor:
        layers = self._folded_layers()
        h, low = self._embeddings(packed)
        total = h.shape[0]
        # The C++ attention kernel adds the QKV bias itself: the projection is then a plain matmul.
        kernel = self._attention_kernel(h.device)
        for i, w in enumerate(layers):
            last = i == len(layers) - 1
            qkv = self._linear(h if low is None else low, w["w_qkv"].t(), None if kernel else w["b_qkv"])
            q, k, v = qkv.view(total, 3, self.heads, self.head_dim).unbind(1)
            ctx = self._attend(q, k, v, packed, w["b_qkv"] if kernel else None).reshape(total, -1)
            h, low = self._add_and_norm(h, ctx, w["w_out_t"], w["ln_attention"], "stream1")
            inner = self._feed_forward_up(h if low is None else low, w)
            # The last layer's output leaves the forward: a tensor of its own, never a reused buffer.
            h, low = self._add_and_norm(h, inner, w["w_down_t"], w["ln_output"], None if last else "stream0")
        return h

    def _embeddings(self, packed: PackedSequences):
        """The embedding step ``LayerNorm(word + position + token type 0)``: the float32 stream and, where fused
        (see :meth:`_fused_norm`), its cast to ``dtype`` (else None), as :meth:`_add_and_norm` returns."""
        emb = self.model.embeddings
        token_type = emb.token_type_embeddings.weight[0]
        if self._fused_norm(packed.input_ids.device):
            from .kernels.residual_layer_norm import embed_layer_norm

            weight, bias, eps = self._embedding_ln
            return embed_layer_norm(packed.input_ids, packed.position_ids, emb.word_embeddings.weight,
                                    emb.position_embeddings.weight, token_type, weight, bias, eps, self.dtype)
        h = emb.word_embeddings(packed.input_ids) + emb.position_embeddings(packed.position_ids)
        return self._layer_norm(h.add_(token_type), self._embedding_ln, "stream0"), None

    def _fused_norm(self, device: torch.device) -> bool:
        """Whether the residual add, LayerNorm and cast to ``dtype`` are one Triton kernel: in reduced
        precision on CUDA, where Triton is installed."""
        return self.dtype != torch.float32 and device.type == "cuda" and _extension.has_triton()

    def _add_and_norm(self, stream: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, params, buffer: str | None):
        """The post-LN residual step ``LayerNorm(stream + x @ w_t)``: the new float32 stream and, where the
        step is fused (see :meth:`_fused_norm`), its cast to ``dtype`` for the next matmul (else None:
        ``_linear`` casts)."""
        if self._fused_norm(stream.device):
            from .kernels.residual_layer_norm import residual_layer_norm_

            low = torch.empty(stream.shape, dtype=self.dtype, device=stream.device)
            weight, bias, eps = params
            return residual_layer_norm_(stream, x.to(self.dtype) @ w_t, weight, bias, eps, low), low
        return self._layer_norm(self._residual_matmul(stream, x, w_t), params, buffer), None

    def _feed_forward_up(self, h: torch.Tensor, w: dict) -> torch.Tensor:
        """activation(h @ w_up + b_up). In float32 on the CPU with the exact GELU, bias and GELU are one pass of
        a C++ kernel over the product: addmm's bias would otherwise be copied into the output first."""
        if self.act in ("gelu", "gelu_python") and self._cpu_kernels(h.device):
            inner = self._linear(h, w["w_up_t"], None)
            torch.ops.ospo_fast.bias_gelu_(inner, w["b_up"])
            return inner
        return _activation_(self._linear(h, w["w_up_t"], w["b_up"]), self.act)

    def _buffer(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A ``[rows, cols]`` activation buffer kept across layers and calls (float32 path).

        A CPU forward of a few thousand tokens allocates activations of tens of MB; fresh allocations that
        large come from the OS zeroed, page by page, on every call (about 15% of the forward's time). The
        buffers grow to the largest batch seen and are reused: the residual stream alternates between two
        of them, and QKV and FFN-up share one (QKV is dead before FFN-up is computed)."""
        numel = rows * cols
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != like.device or buf.dtype != like.dtype:
            buf = self._buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(rows, cols)

    def release_buffers(self) -> None:
        """Frees the activation buffers (the next call allocates them again)."""
        with self._lock:
            self._buffers.clear()

    def _linear(self, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """bias + x @ w_t (None: no bias): into the shared "wide" buffer in float32; in reduced precision, out
        of place and in ``dtype``."""
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
            return x @ w_t if bias is None else torch.addmm(bias, x, w_t)
        out = self._buffer("wide", x.shape[0], w_t.shape[1], x)
        return torch.mm(x, w_t, out=out) if bias is None else torch.addmm(bias, x, w_t, out=out)

    def _residual_matmul(self, stream: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        """stream + x @ w_t: accumulated into the stream in place in float32; in reduced precision, the
        product in ``dtype`` added to the float32 stream."""
        if self.dtype == torch.float32:
            return stream.addmm_(x, w_t)
        return stream + x.to(self.dtype) @ w_t

    def _layer_norm(self, x: torch.Tensor, params, buffer: str | None) -> torch.Tensor:
        """LayerNorm of x; in float32 written to the named buffer (None: a new tensor)."""
        weight, bias, eps = params
        if self.dtype != torch.float32 or buffer is None:
            return F.layer_norm(x, weight.shape, weight, bias, eps)
        out = self._buffer(buffer, x.shape[0], x.shape[1], x)
        if self._cpu_kernels(x.device):
            # Straight into the buffer: native_layer_norm.out computes into a new tensor and copies it over.
            torch.ops.ospo_fast.layer_norm_rows(x, weight, bias, eps, out)
            return out
        rows = x.shape[0]
        mean, rstd = self._buffer("ln_mean", rows, 1, x), self._buffer("ln_rstd", rows, 1, x)
        torch.ops.aten.native_layer_norm.out(x, weight.shape, weight, bias, eps, out0=out, out1=mean, out2=rstd)
        return out


_POOLING_METHODS = ("runs", "segments", "triton")


def pool_packed(
    hidden: torch.Tensor, packed: PackedSequences, pooling: str, method: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sentence embeddings float ``[S, hidden]`` (L2-normalised) from packed hidden states, written to ``out``
    (float32 ``[S, hidden]``, contiguous) when given.

    ``method`` (None: "runs" on the CPU; on a GPU "triton" where installed, else "segments"):

    * "runs": one view per run of equal-length sequences (the CPU's way: a handful of runs);
    * "segments": a fixed handful of kernels whatever the lengths (a GPU batch has dozens of distinct
      lengths): a segment sum by sequence (ids from the positions, no host data) or a gather of first tokens;
    * "triton": one kernel, a program per sequence (``ospo_fast/kernels/pool_sequences.py``), with no atomics.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling: the packed path supports 'mean' and 'cls', got {pooling!r}")
    if method is None:
        method = ("triton" if _extension.has_triton() else "segments") if hidden.is_cuda else "runs"
    if method not in _POOLING_METHODS:
        raise ValueError(f"method: expected one of {_POOLING_METHODS}, got {method!r}")
    if method == "triton":
        from .kernels.pool_sequences import pool_sequences

        if out is None:
            out = hidden.new_empty(packed.num_sequences, hidden.shape[1], dtype=torch.float32)
        return pool_sequences(hidden, packed.cu_seqlens, out, mean=pooling == "mean")
    if method == "segments":
        starts = packed.cu_seqlens[:-1].long()
        if pooling == "cls":
            emb = hidden[starts].float()
        else:
            sequence = torch.cumsum(packed.position_ids == 0, 0) - 1
            sums = hidden.new_zeros(packed.num_sequences, hidden.shape[1], dtype=torch.float32)
            sums.index_add_(0, sequence, hidden.float())
            emb = sums / (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).float()[:, None]
    else:
        emb = hidden.new_empty(packed.num_sequences, hidden.shape[1])
        for start, first, count, length in packed.runs():
            block = hidden[start : start + count * length].view(count, length, -1)
            emb[first : first + count] = block.mean(1) if pooling == "mean" else block[:, 0]
    normalised = F.normalize(emb.float(), p=2, dim=-1)
    return normalised if out is None else out.copy_(normalised)


# ----------------------------------------------------------------------------------------------------
# Encoder rewards


# Odd multipliers that fold a row of phrase ids into one 64-bit key (wrapping arithmetic).
_ROW_KEY_MULTIPLIERS = np.random.default_rng(0x05F0).integers(1, 1 << 62, size=MAX_PLAYERS, dtype=np.int64) * 2 + 1


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For int64 ``rows [N, W]``: the index of one row of each distinct value, and for every row the number
    of its distinct value. Rows are compared by a 64-bit key, checked exactly (np.unique over whole rows is
    about 10x slower); on a key collision the rows themselves are compared."""
    keys = rows @ _ROW_KEY_MULTIPLIERS[: rows.shape[1]]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not np.array_equal(rows[first][inverse], rows):
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    return first, inverse


# Phrases whose tokens an evaluator keeps; past this, the cache starts over (memory stays bounded).
_PHRASE_CACHE_SIZE = 1 << 17


class EncoderCoalitionEvaluator:
    """Values of every coalition of a batch for a :class:`~ospo_fast.rewards.DenseRetrievalReward`, with one
    packed encoder forward.

    ``chunk_tokens`` bounds the packed tokens of one forward (memory); larger batches are split into
    several forwards of that size. ``pack_backend``: see :func:`pack_coalitions`. ``dtype``: the encoder's
    matmul precision; None is float32 on the CPU (the per-coalition loop's numbers to fp32 tolerance) and
    bfloat16 on CUDA; ``torch.bfloat16`` on a CPU with AMX is several times faster, to bf16 tolerance.
    ``attention`` and ``dtype`` are checked here (see :func:`check_packed_options`; a dtype may be named).
    Threads may share an evaluator: the phrase cache (with the tokenizer) and the forward each run under a
    lock, and the rest of a call is its own.
    """

    def __init__(
        self,
        reward,
        attention: str = "auto",
        chunk_tokens: int = 1 << 16,
        pack_backend: str = "auto",
        dtype: torch.dtype | None = None,
    ):
        self.reward = reward
        self.encoder = reward.encoder
        tok = self.encoder.tokenizer
        if getattr(self.encoder, "pooling", "mean") not in ("mean", "cls"):
            raise ValueError("reward.encoder.pooling: the packed path supports 'mean' and 'cls', "
                             f"got {self.encoder.pooling!r}")
        attention, dtype = check_packed_options(attention, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if reward.device.type == "cuda" else torch.float32
        self.forward = PackedBertForward(self.encoder.model, attention=attention, dtype=dtype)
        self.cls_id, self.sep_id = tok.cls_token_id, tok.sep_token_id
        self.max_length = self.encoder.max_length
        self.chunk_tokens = chunk_tokens
        self.pack_backend = pack_backend
        self._phrase_tokens: dict[str, list[int]] = {}  # phrase or gap -> its token ids (see _player_tokens)
        self._phrase_lock = threading.Lock()  # the cache and the tokenizer are shared by concurrent calls

    def __call__(self, coalitions: CoalitionBatch) -> tuple[torch.Tensor, int]:
        """Values float32 ``[coalitions.batch.num_values]`` on the reward's device, and the number of
        sequences embedded."""
        layout = self.layout(coalitions)
        return self.values(layout), layout.num_sequences

    def embed(self, coalitions: CoalitionBatch) -> tuple[torch.Tensor, np.ndarray]:
        """Embeddings float32 ``[S, D]`` of the distinct coalition sequences, and for every value of
        ``coalitions.batch`` the row of its sequence (int64 ``[num_values]``)."""
        layout = self.layout(coalitions)
        return self.embed_layout(layout), layout.value_sequence

    def values(self, layout: "PackedLayout") -> torch.Tensor:
        """The device half: pack, embed, score. Values float32 ``[num_values]``; never synchronises a GPU
        stream (the host arrays go over in one non-blocking copy)."""
        embeddings, (sequence, owners) = self._embed(layout, layout.value_sequence, layout.value_owners)
        return self.reward.score_embeddings(embeddings[sequence], owners)

    def layout(self, coalitions: CoalitionBatch) -> "PackedLayout":
        """The host half: tokenise the players of the distinct texts and the text between them (each piece
        of text once, see :meth:`_player_tokens`) and lay out the sequences to embed."""
        seg_u, plans_u = coalitions.segmentations, coalitions.plans
        U = len(seg_u)
        tokens = self._player_tokens(seg_u)
        text_lengths = tokens.player_tokens.sum(axis=1) + tokens.gap_tokens.sum(axis=1)
        text_offsets = np.concatenate([[0], np.cumsum(text_lengths)]).astype(np.int64)
        width = tokens.player_tokens.shape[1]

        # Every coalition of every distinct text, flat: its kept tokens, and its content (what its coalition
        # text is made of, in order), from its bit mask. A gap enters with the player before it when the
        # player after it is kept too; a gap without tokens (whitespace) is the space of a removed run.
        sizes = np.asarray([p.num_coalitions for p in plans_u], dtype=np.int64)
        keys = np.concatenate([p.coalition_keys() for p in plans_u]) if U else np.zeros(0, dtype=np.int64)
        coalition_text = np.repeat(np.arange(U), sizes)
        kept = np.zeros(len(keys), dtype=np.int64)
        # One column per kept player, in order: (1 + its phrase id) << 32 | (1 + the id of the gap after it,
        # or 0). Piece ids count the pieces of one batch (< 2**31), so the pair is exact.
        content = np.zeros((len(keys), width), dtype=np.int64)  # 0 past the last kept player
        rank = np.zeros(len(keys), dtype=np.int64)
        for player in range(width):
            rows = np.flatnonzero((keys >> player) & 1)
            text = coalition_text[rows]
            kept[rows] += tokens.player_tokens[text, player]
            gap = np.zeros(len(rows), dtype=np.int64)
            if player + 1 < width:  # the last player has no gap after it (and no bit 64 to test)
                with_next = ((keys[rows] >> (player + 1)) & 1) == 1
                kept[rows] += np.where(with_next, tokens.gap_tokens[text, player], 0)
                gap = np.where(with_next, 1 + tokens.gap_pieces[text, player], 0)
            content[rows, rank[rows]] = ((1 + tokens.player_pieces[text, player]) << 32) | gap
            rank[rows] += 1

        # Sequence 0 is the empty coalition, shared by every response; then one sequence per distinct
        # content: coalitions of different responses with the same coalition text embed identically.
        nonempty = np.flatnonzero(keys)
        sequence_of = np.zeros(len(keys), dtype=np.int64)
        representative = nonempty
        if len(nonempty):
            first, inverse = _distinct_rows(content[nonempty])
            representative = nonempty[first]
            sequence_of[nonempty] = 1 + inverse
        lengths = np.concatenate([[2], 2 + np.minimum(kept[representative], self.max_length - 2)])
        # Sequences sorted by length, so equal lengths form runs (see PackedBertForward).
        order = np.argsort(lengths, kind="stable")
        position_of = np.empty_like(order)
        position_of[order] = np.arange(len(order))
        unique_rows, coalition = coalitions.value_rows()
        first_coalition = np.concatenate([[0], np.cumsum(sizes)])
        return PackedLayout(
            token_ids=tokens.token_ids,
            token_need=tokens.token_need,
            text_offsets=text_offsets,
            max_text_tokens=int(text_lengths.max(initial=0)),
            lengths=lengths[order],
            seq_text=np.concatenate([[-1], coalition_text[representative]])[order],
            seq_keep=np.concatenate([[0], keys[representative]])[order],
            value_sequence=position_of[sequence_of[first_coalition[unique_rows] + coalition]],
            value_owners=coalitions.value_owners(),
        )

    def _player_tokens(self, segmentations: Sequence[Segmentation]) -> "_TextTokens":
        """The tokens of every player of every text and of the text between consecutive players (its *gaps*),
        in text order: player 0, gap 0, player 1, ..., the last player (see :class:`_TextTokens`).

        Each piece is tokenised on its own: players start and end where a BERT pre-tokenizer splits anyway
        (whitespace, punctuation), so a piece's tokens are the ones it has in the response and in every
        coalition text that holds it (a gap sits between the same characters there as in the response).
        Whitespace gaps give no token. Text before the first player and after the last (a think block, the
        tags) never enters a coalition and is not tokenised at all. Pieces recur across the responses of a
        batch and across batches, so their tokens are kept (up to ``_PHRASE_CACHE_SIZE`` pieces): one
        tokenizer call covers the new ones."""
        pieces = []  # per text: player 0, gap 0, player 1, ..., the last player (2n - 1 pieces)
        for sg in segmentations:
            for i, (start, end) in enumerate(sg.spans):
                if i:
                    pieces.append(sg.text[sg.spans[i - 1][1] : start])
                pieces.append(sg.text[start:end])
        cache = self._phrase_tokens
        with self._phrase_lock:  # another call could clear the cache between our update and our reads
            new = list(dict.fromkeys(p for p in pieces if p not in cache))
            if new and len(cache) + len(new) > _PHRASE_CACHE_SIZE:
                cache.clear()  # start over with this batch's pieces
                new = list(dict.fromkeys(pieces))
            if new:
                ids = self.encoder.tokenizer(tokenizable(new), add_special_tokens=False, truncation=False)["input_ids"]
                cache.update(zip(new, ids))
            piece_ids = [cache[p] for p in pieces]
        counts = np.fromiter(map(len, piece_ids), dtype=np.int64, count=len(pieces))
        token_ids = np.fromiter(chain.from_iterable(piece_ids), dtype=np.int64, count=int(counts.sum()))
        U = len(segmentations)
        players_per_text = np.fromiter((sg.num_players for sg in segmentations), dtype=np.int64, count=U)
        pieces_per_text = np.maximum(2 * players_per_text - 1, 0)
        text_of_piece = np.repeat(np.arange(U), pieces_per_text)
        k = np.arange(len(pieces)) - np.repeat(np.cumsum(pieces_per_text) - pieces_per_text, pieces_per_text)
        player, is_gap = k >> 1, (k & 1) == 1  # piece k is player k // 2, or the gap after it when k is odd
        # Player i's tokens need bit i; the gap after it needs bits i and i + 1 (i + 1 <= 63: a player follows).
        need = np.int64(1) << player
        need[is_gap] |= np.int64(1) << (player[is_gap] + 1)
        numbering: dict[str, int] = {}
        ids = np.fromiter((numbering.setdefault(p, len(numbering)) for p in pieces), np.int64, len(pieces))
        ids[is_gap & (counts == 0)] = -1  # a gap without tokens adds nothing to a coalition's tokens
        width = int(players_per_text.max(initial=0))

        def table(values: np.ndarray, which: np.ndarray, fill: int) -> np.ndarray:
            out = np.full((U, width), fill, dtype=np.int64)
            out[text_of_piece[which], player[which]] = values[which]
            return out

        return _TextTokens(
            token_ids=token_ids,
            token_need=np.repeat(need, counts),
            player_tokens=table(counts, ~is_gap, 0),
            gap_tokens=table(counts, is_gap, 0),
            player_pieces=table(ids, ~is_gap, -1),
            gap_pieces=table(ids, is_gap, -1),
        )

    def embed_layout(self, layout: "PackedLayout") -> torch.Tensor:
        """Embeddings float32 ``[S, D]`` of the layout's sequences: packed on the device, one forward per
        chunk of at most ``chunk_tokens`` tokens."""
        return self._embed(layout)[0]

    def _embed(self, layout: "PackedLayout", *extra: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`embed_layout`, and the host arrays ``extra`` on the device: every host array of the call
        goes over in one transfer (see :func:`to_device_all`)."""
        device = self.reward.device
        lengths = layout.lengths
        chunks = _chunks(lengths, self.chunk_tokens)
        host = [layout.token_ids, layout.token_need, layout.text_offsets, layout.seq_text, layout.seq_keep, *extra]
        for lo, hi in chunks:
            cu = np.zeros(hi - lo + 1, dtype=np.int64)
            np.cumsum(lengths[lo:hi], out=cu[1:])
            positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths[lo:hi])
            host += [cu, cu.astype(np.int32), positions]
        token_ids, token_need, text_offsets, seq_text, seq_keep, *rest = to_device_all(host, device)
        extra_on_device, per_chunk = rest[: len(extra)], rest[len(extra) :]
        embeddings = torch.empty(len(lengths), self.encoder.dim, dtype=torch.float32, device=device)
        for c, (lo, hi) in enumerate(chunks):
            cu, cu32, positions = per_chunk[3 * c : 3 * c + 3]
            input_ids = pack_coalitions(
                token_ids, token_need, text_offsets, seq_text[lo:hi], seq_keep[lo:hi], cu,
                cls_id=self.cls_id, sep_id=self.sep_id, total_tokens=positions.shape[0],
                max_text_tokens=layout.max_text_tokens, backend=self.pack_backend,
            )
            packed = PackedSequences(input_ids=input_ids, position_ids=positions, cu_seqlens=cu32,
                                     lengths=lengths[lo:hi])
            hidden = self.forward.hidden_states(packed)
            pool_packed(hidden, packed, self.encoder.pooling, out=embeddings[lo:hi])
        return embeddings, extra_on_device


@dataclass
class _TextTokens:
    """The pieces of the distinct texts tokenised (:meth:`EncoderCoalitionEvaluator._player_tokens`): per text,
    player 0, gap 0 (the text between players 0 and 1), player 1, ..., the last player. The tables are
    int64 ``[U, most players]``, column i for player i and for the gap after it; a piece id numbers the
    distinct piece texts of the batch (equal texts, equal ids)."""

    token_ids: np.ndarray  # int64 [N]: the pieces' tokens, concatenated in order
    token_need: np.ndarray  # int64 [N]: the players each token needs kept (see pack_coalitions_reference)
    player_tokens: np.ndarray  # token count of player i (0 past a text's last player)
    gap_tokens: np.ndarray  # token count of the gap after player i (0 after the last player)
    player_pieces: np.ndarray  # piece id of player i (-1 past the last player)
    gap_pieces: np.ndarray  # piece id of the gap after player i (-1 when it has no token or there is none)


@dataclass
class PackedLayout:
    """The host-side layout of one packed evaluation (:meth:`EncoderCoalitionEvaluator.layout`): the distinct
    texts' tokens, the sequences to embed sorted by length, and for every value of the batch its sequence
    and owner. Everything here is numpy; the device half (:meth:`EncoderCoalitionEvaluator.values`) copies
    it over without a stream sync."""

    token_ids: np.ndarray  # int64 [N]: the tokens of all distinct texts' players and gaps, concatenated
    token_need: np.ndarray  # int64 [N]: the players each token needs kept (see pack_coalitions_reference)
    text_offsets: np.ndarray  # int64 [U + 1]
    max_text_tokens: int
    lengths: np.ndarray  # int64 [S]: sequence lengths, [CLS] and [SEP] included, ascending
    seq_text: np.ndarray  # int64 [S]: each sequence's text (-1: the empty coalition)
    seq_keep: np.ndarray  # int64 [S]: bit mask of each sequence's kept players
    value_sequence: np.ndarray  # int64 [num_values]: the sequence of every value of the batch
    value_owners: np.ndarray  # int64 [num_values]

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)


def _chunks(lengths: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of sequences holding at most ``max_tokens`` tokens each (at least one)."""
    if int(lengths.sum()) <= max_tokens:  # the common case, without a Python loop over the sequences
        return [(0, len(lengths))] if len(lengths) else []
    chunks, lo, total = [], 0, 0
    for s, n in enumerate(lengths.tolist()):
        if s > lo and total + n > max_tokens:
            chunks.append((lo, s))
            lo, total = s, 0
        total += n
    chunks.append((lo, len(lengths)))
    return chunks
