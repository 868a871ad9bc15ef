"""Compile every Triton kernel of ospo_fast for NVIDIA GPUs, on any machine: no GPU needed.

The interpreter that runs the kernels on a CPU (``TRITON_INTERPRET=1``) accepts code that the compiler
refuses (a loop-carried value that changes type, for one), so the CPU tests alone cannot tell whether a
kernel builds. This compiles each one, with the argument types its launcher passes, to a cubin for each
target (Triton's own ``ptxas``), and prints a line per kernel and target; the exit status is the number
of failures. ``tests/test_kernels_compile.py`` runs it.

    python scripts/compile_triton_kernels.py [--arch 80 90]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones (before triton is imported)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ospo_fast.kernels import grpo_loss, owen_aggregate, pack_coalitions, pool_sequences, residual_layer_norm  # noqa: E402


def _pointers(names: str, dtype: str) -> dict:
    return {name: f"*{dtype}" for name in names.split()}


def _grpo(backward: bool, logits: str, flags: bool) -> tuple:
    signature = {"grad": "*fp32"} if backward else {}
    signature |= {"logits": f"*{logits}", "stride_ln": "i64", "stride_lt": "i64"}
    signature |= {"dlogits": f"*{logits}"} if backward else {}
    signature |= {"ids": "*i64"} | _pointers("mask adv old ref", "fp32")
    signature |= (_pointers("logp_in lse_in", "fp32") if backward
                  else _pointers("logp_out lse_out ratio_out loss_out kl_out", "fp32"))
    signature |= {"T": "i32", "V": "i32"} | {name: "fp32" for name in ("temperature", "beta", "eps_low", "eps_high")}
    constexprs = {name: flags for name in ("HAS_LOSS", "HAS_MASK", "HAS_OLD", "HAS_REF")} | {"BLOCK_V": 4096}
    signature |= {name: "constexpr" for name in constexprs}
    kernel = grpo_loss._grpo_bwd_kernel if backward else grpo_loss._grpo_fwd_kernel
    return kernel, signature, constexprs


def kernels() -> list[tuple[str, object, dict, dict]]:
    """(label, kernel, signature, constexprs): every kernel, in the variants its launchers use."""
    out = []
    for dtype in ("fp32", "fp64"):
        signature = {"values": f"*{dtype}"} | _pointers("value_offsets row_offsets game_ptr_base player_ptr "
                                                        "term_plus term_minus", "i64")
        signature |= {"term_weight": f"*{dtype}", "out": f"*{dtype}", "num_rows": "i32", "num_games": "i32",
                      "max_terms": "i32"}
        constexprs = {"SEARCH_STEPS": 13, "BLOCK_ROWS": 128}
        out.append((f"owen_aggregate {dtype}", owen_aggregate._owen_aggregate_kernel,
                    signature | dict.fromkeys(constexprs, "constexpr"), constexprs))
    signature = _pointers("token_ids token_need text_offsets seq_text seq_keep cu_seqlens out", "i64")
    signature |= {"cls_id": "i32", "sep_id": "i32", "max_text_tokens": "i32", "BLOCK": "constexpr"}
    out.append(("pack_coalitions", pack_coalitions._pack_coalitions_kernel, signature, {"BLOCK": 128}))
    for low in ("bf16", "fp16"):
        signature = {"stream": "*fp32", "delta": f"*{low}", "weight": "*fp32", "bias": "*fp32", "low": f"*{low}",
                     "n_cols": "i32", "eps": "fp32", "BLOCK": "constexpr"}
        out.append((f"residual_layer_norm {low}", residual_layer_norm._residual_layer_norm_kernel, signature,
                    {"BLOCK": 512}))
    signature = _pointers("ids positions", "i64") | _pointers("word position token_type weight bias stream", "fp32")
    signature |= {"low": "*bf16", "n_cols": "i32", "eps": "fp32", "BLOCK": "constexpr"}
    out.append(("embed_layer_norm", residual_layer_norm._embed_layer_norm_kernel, signature, {"BLOCK": 512}))
    for hidden, mean in (("bf16", True), ("fp32", False)):
        signature = {"hidden": f"*{hidden}", "cu_seqlens": "*i32", "out": "*fp32", "n_cols": "i32"}
        signature |= dict.fromkeys(("MEAN", "BLOCK_ROWS", "BLOCK_COLS"), "constexpr")
        out.append((f"pool_sequences {'mean' if mean else 'cls'}", pool_sequences._pool_sequences_kernel, signature,
                    {"MEAN": mean, "BLOCK_ROWS": 8, "BLOCK_COLS": 512}))
    for backward in (False, True):
        for logits, flags in (("bf16", True), ("fp32", False)):
            kernel, signature, constexprs = _grpo(backward, logits, flags)
            out.append((f"grpo_{'bwd' if backward else 'fwd'} {logits}", kernel, signature, constexprs))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities (80: A100, 90: H100/H200)")
    args = parser.parse_args(argv)
    failures = 0
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for label, kernel, signature, constexprs in kernels():
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                          target=target)
                print(f"sm_{arch} {label:<28} ok ({len(compiled.asm['cubin'])} bytes of cubin)")
            except Exception as exc:
                failures += 1
                print(f"sm_{arch} {label:<28} FAILED: {type(exc).__name__}: {str(exc)[-1500:]}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
