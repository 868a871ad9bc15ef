"""The encoder forward on a packed batch: a BERT-family encoder re-run with the model's own weights on
variable-length sequences (attention, LayerNorm and activation each on the backend :mod:`ospo_fast.dispatch`
picks), and the pooling of its hidden states into sentence embeddings."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .. import _extension, dispatch
from .packing import PackedSequences

#: Attention backends of the packed forward.
ATTENTIONS = dispatch.choices("attention")
#: Matmul precisions of the packed forward.
PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_packed_options(attention, dtype, dtype_name: str = "dtype") -> tuple[str, torch.dtype | None]:
    """``(attention, dtype)`` of the packed forward after checking them; ``dtype`` may be given by name
    ("bfloat16" or "torch.bfloat16"). None stays None (the evaluator's default). ValueError naming the
    option (``dtype_name``: what the caller calls it) and its supported values otherwise."""
    dispatch.check_choice("attention", attention, "attention")
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

    @classmethod
    def unsupported(cls, model) -> str | None:
        """Why the packed forward cannot re-run ``model`` (its architecture), or None when it can. Reads the
        config only."""
        config = getattr(model, "config", None)
        if config is None:
            return f"the packed forward needs a Hugging Face model with a config, got {type(model).__name__}"
        if getattr(config, "model_type", None) not in cls.SUPPORTED:
            return f"the packed forward supports {cls.SUPPORTED}, got {getattr(config, 'model_type', None)!r}"
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            return "the packed forward needs absolute position embeddings"
        if getattr(config, "hidden_act", None) not in _ACTIVATIONS:
            return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not supported by the packed forward"
        return None

    def __init__(self, model, attention: str = "auto", dtype: torch.dtype = torch.float32):
        reason = self.unsupported(model)
        if reason is not None:
            raise ValueError(f"encoder: {reason}")
        config = model.config
        # An explicit attention the device or dtype cannot run is refused here, not at the first forward.
        dispatch.resolve("attention", attention, next(model.parameters()).device, dtype, arg="attention")
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

    def _attention(self, device: torch.device) -> str:
        """The attention that runs on ``device``: "flash", "cpp" (the extension's varlen kernel) or "sdpa"."""
        return dispatch.resolve("attention", self.attention, device, self.dtype, arg="attention")

    def _attend(self, q, k, v, packed: PackedSequences, attention: str, qkv_bias=None) -> torch.Tensor:
        """q, k, v: [total, heads, head_dim] -> [total, heads, head_dim] with ``attention`` (see
        :meth:`_attention`); ``qkv_bias`` (the C++ kernel only) is added to q, k and v inside it."""
        if attention == "flash":
            cu = packed.cu_seqlens
            return _extension.flash_varlen()(q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen)
        if attention == "cpp":
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
        attention = self._attention(h.device)
        kernel = attention == "cpp"
        for i, w in enumerate(layers):
            last = i == len(layers) - 1
            qkv = self._linear(h if low is None else low, w["w_qkv"].t(), None if kernel else w["b_qkv"])
            q, k, v = qkv.view(total, 3, self.heads, self.head_dim).unbind(1)
            ctx = self._attend(q, k, v, packed, attention, w["b_qkv"] if kernel else None).reshape(total, -1)
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
            from ..kernels.residual_layer_norm import embed_layer_norm

            weight, bias, eps = self._embedding_ln
            return embed_layer_norm(packed.input_ids, packed.position_ids, emb.word_embeddings.weight,
                                    emb.position_embeddings.weight, token_type, weight, bias, eps, self.dtype)
        h = emb.word_embeddings(packed.input_ids) + emb.position_embeddings(packed.position_ids)
        return self._layer_norm(h.add_(token_type), self._embedding_ln, "stream0"), None

    def _norm(self, device: torch.device) -> str:
        """The LayerNorm steps' implementation on ``device``: "triton" (fused with the residual add and the cast
        to ``dtype``: reduced precision on CUDA), "cpp" (row kernel into a buffer: float32 on the CPU) or
        "torch"."""
        return dispatch.resolve("norm", "auto", device, self.dtype)

    def _fused_norm(self, device: torch.device) -> bool:
        """Whether the residual add, LayerNorm and cast to ``dtype`` are one Triton kernel."""
        return self._norm(device) == "triton"

    def _add_and_norm(self, stream: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, params, buffer: str | None):
        """The post-LN residual step ``LayerNorm(stream + x @ w_t)``: the new float32 stream and, where the
        step is fused (see :meth:`_fused_norm`), its cast to ``dtype`` for the next matmul (else None:
        ``_linear`` casts)."""
        if self._fused_norm(stream.device):
            from ..kernels.residual_layer_norm import residual_layer_norm_

            low = torch.empty(stream.shape, dtype=self.dtype, device=stream.device)
            weight, bias, eps = params
            return residual_layer_norm_(stream, x.to(self.dtype) @ w_t, weight, bias, eps, low), low
        return self._layer_norm(self._residual_matmul(stream, x, w_t), params, buffer), None

    def _feed_forward_up(self, h: torch.Tensor, w: dict) -> torch.Tensor:
        """activation(h @ w_up + b_up). In float32 on the CPU with the exact GELU, bias and GELU are one pass of
        a C++ kernel over the product: addmm's bias would otherwise be copied into the output first."""
        exact_gelu = self.act in ("gelu", "gelu_python")
        if exact_gelu and dispatch.resolve("activation", "auto", h.device, self.dtype) == "cpp":
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
        if self._norm(x.device) == "cpp":
            # Straight into the buffer: native_layer_norm.out computes into a new tensor and copies it over.
            torch.ops.ospo_fast.layer_norm_rows(x, weight, bias, eps, out)
            return out
        rows = x.shape[0]
        mean, rstd = self._buffer("ln_mean", rows, 1, x), self._buffer("ln_rstd", rows, 1, x)
        torch.ops.aten.native_layer_norm.out(x, weight.shape, weight, bias, eps, out0=out, out1=mean, out2=rstd)
        return out


def pool_packed(
    hidden: torch.Tensor, packed: PackedSequences, pooling: str, method: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sentence embeddings float ``[S, hidden]`` (L2-normalised) from packed hidden states, written to ``out``
    (float32 ``[S, hidden]``, contiguous) when given.

    ``method`` (None or "auto": "runs" on the CPU; on a GPU "triton" where installed, else "segments"; see
    :mod:`ospo_fast.dispatch`):

    * "runs": one view per run of equal-length sequences (the CPU's way: a handful of runs);
    * "segments": a fixed handful of kernels whatever the lengths (a GPU batch has dozens of distinct
      lengths): a segment sum by sequence (ids from the positions, no host data) or a gather of first tokens;
    * "triton": one kernel, a program per sequence (``ospo_fast/kernels/pool_sequences.py``), with no atomics.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling: the packed path supports 'mean' and 'cls', got {pooling!r}")
    method = dispatch.resolve("pooling", "auto" if method is None else method, hidden.device, arg="method")
    if method == "triton":
        from ..kernels.pool_sequences import pool_sequences

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
