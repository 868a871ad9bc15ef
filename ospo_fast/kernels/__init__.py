"""Triton kernels of ospo_fast, installed as ``ospo_fast.kernels``.

Each module holds one kernel and its launcher; users call them through ``ospo_fast``'s public functions,
which check arguments and choose a backend. On a CPU machine they run under ``TRITON_INTERPRET=1``.
"""
