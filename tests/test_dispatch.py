"""The backend choice of every op (ospo_fast.dispatch): explicit choices honoured or refused, automatic ones
logged once."""

from __future__ import annotations

import logging

import pytest
import torch

from ospo_fast import _extension, dispatch, loss, owen

CPU = torch.device("cpu")


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """Nothing logged yet in this process, and the ``ospo_fast`` logger captured at INFO."""
    monkeypatch.setattr(dispatch, "_logged", set())
    caplog.set_level(logging.INFO, logger="ospo_fast")
    return caplog


def test_every_op_offers_auto_first_and_the_public_constants_are_its_choices():
    assert all(op.choices[0] == "auto" for op in dispatch.OPS.values())
    assert owen.BACKENDS == dispatch.choices("aggregation") == ("auto", "torch", "cpp", "cuda", "triton")
    assert loss.LOSS_BACKENDS == dispatch.choices("loss") == ("auto", "torch", "triton")


@pytest.mark.parametrize(
    "op,choice,device,dtype,arg,message",
    [
        ("aggregation", "cuda", "cpu", None, "backend", "backend='cuda' runs on CUDA tensors; the values are on cpu"),
        ("aggregation", "cpp", "meta", None, "backend", "backend='cpp' runs on CPU tensors; the values are on meta"),
        ("loss", "triton", "cpu", None, "backend", "backend='triton' "),
        ("packing", "triton", "cpu", None, "backend", "backend='triton' "),
        ("pooling", "triton", "cpu", None, "method", "method='triton' "),
        ("attention", "flash", "cpu", torch.float32, "attention", "attention='flash' needs flash-attn"),
        ("attention", "flash", "cpu", torch.bfloat16, "attention", "attention='flash' needs flash-attn"),
    ],
)
def test_explicit_choice_that_cannot_run_here_raises_naming_the_argument(monkeypatch, op, choice, device, dtype,
                                                                        arg, message):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton on CPU tensors only runs in the interpreter
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        dispatch.resolve(op, choice, device, dtype, arg=arg)


def test_explicit_cpp_without_the_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(_extension, "has_cpp", lambda: False)
    with pytest.raises(ValueError, match=r"backend='cpp' needs the compiled extension ospo_fast\._C; it is not built"):
        dispatch.resolve("aggregation", "cpp", CPU)


def test_explicit_triton_without_triton_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(_extension, "has_triton", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton' needs triton; it is not installed \(pip install triton\)"):
        dispatch.resolve("loss", "triton", CPU)


@pytest.mark.parametrize("op", sorted(dispatch.OPS))
def test_unknown_choice_lists_the_choices_under_the_callers_name(op):
    with pytest.raises(ValueError, match=r"^method: expected one of \('auto'.*got 'fastest'"):
        dispatch.resolve(op, "fastest", CPU, torch.float32, arg="method")


def test_explicit_choices_that_can_run_are_honoured():
    assert dispatch.resolve("aggregation", "torch", CPU) == "torch"
    assert dispatch.resolve("pooling", "segments", CPU, arg="method") == "segments"
    assert dispatch.resolve("attention", "sdpa", CPU, torch.float32, arg="attention") == "sdpa"
    if _extension.has_cpp():
        assert dispatch.resolve("aggregation", "cpp", "cpu") == "cpp"


def test_auto_choices_on_the_cpu():
    cpp = _extension.has_cpp()
    assert dispatch.resolve("aggregation", "auto", CPU) == ("cpp" if cpp else "torch")
    assert dispatch.resolve("loss", "auto", CPU) == "torch"
    assert dispatch.resolve("packing", "auto", CPU) == "torch"
    assert dispatch.resolve("pooling", "auto", CPU) == "runs"
    assert dispatch.resolve("attention", "auto", CPU, torch.float32) == ("cpp" if cpp else "sdpa")
    assert dispatch.resolve("attention", "auto", CPU, torch.bfloat16) == "sdpa"
    assert dispatch.resolve("norm", "auto", CPU, torch.float32) == ("cpp" if cpp else "torch")
    assert dispatch.resolve("norm", "auto", CPU, torch.bfloat16) == "torch"
    assert dispatch.resolve("activation", "auto", CPU, torch.float32) == ("cpp" if cpp else "torch")


def test_auto_never_picks_the_triton_interpreter_on_the_cpu(monkeypatch):
    monkeypatch.setattr(_extension, "has_triton", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op in ("loss", "packing"):
        assert dispatch.resolve(op, "auto", CPU) == "torch"
    assert dispatch.resolve("pooling", "auto", CPU) == "runs"


def test_auto_choices_on_cuda_follow_what_is_installed(monkeypatch):
    """Resolution reads the device and the capability queries only: no CUDA device is needed to check it."""
    cuda = torch.device("cuda")
    for cuda_kernels, triton, aggregation in ((True, True, "cuda"), (False, True, "triton"), (False, False, "torch")):
        monkeypatch.setattr(_extension, "has_cuda_kernels", lambda value=cuda_kernels: value)
        monkeypatch.setattr(_extension, "has_triton", lambda value=triton: value)
        assert dispatch.resolve("aggregation", "auto", cuda) == aggregation
        assert dispatch.resolve("loss", "auto", cuda) == ("triton" if triton else "torch")
        assert dispatch.resolve("pooling", "auto", cuda) == ("triton" if triton else "segments")
        assert dispatch.resolve("norm", "auto", cuda, torch.bfloat16) == ("triton" if triton else "torch")
        assert dispatch.resolve("norm", "auto", cuda, torch.float32) == "torch"


def test_an_automatic_choice_is_logged_once_per_op_device_type_and_choice(fresh_log):
    for _ in range(3):
        dispatch.resolve("loss", "auto", CPU)
        dispatch.resolve("pooling", "auto", "cpu")
    dispatch.resolve("loss", "torch", CPU)  # explicit: nothing to report
    records = [r for r in fresh_log.records if r.name == "ospo_fast"]
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    assert "loss on cpu runs torch" in records[0].getMessage()
    assert "pooling on cpu runs runs" in records[1].getMessage()


def test_the_public_resolvers_go_through_dispatch(fresh_log):
    assert owen.resolve_backend("auto", CPU) == dispatch.resolve("aggregation", "auto", CPU)
    assert loss.resolve_loss_backend("auto", CPU) == "torch"
    assert len([r for r in fresh_log.records if r.name == "ospo_fast"]) == 2
    with pytest.raises(ValueError, match="backend: expected one of"):
        owen.resolve_backend("numpy", CPU)
