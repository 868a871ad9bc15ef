"""Kernel micro-benchmarks (pytest-benchmark); a package so that its conftest does not shadow tests/conftest.py
when both folders are collected in one session. See README.md."""
