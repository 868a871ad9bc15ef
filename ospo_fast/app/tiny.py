"""The tiny policy of tests and quick demos: a small causal LM built from a config, with a byte-level BPE
tokenizer trained on local texts (nothing is downloaded). The answer tags are ordinary added tokens, so they
survive ``decode(skip_special_tokens=True)``."""

from __future__ import annotations

from typing import Iterable

import torch

from ..policy import SIMPLE_CHAT_TEMPLATE

#: The model name that selects the tiny policy (``--model tiny``).
TINY_MODEL = "tiny"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast`` with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size: expected an int >= 300 (256 bytes plus merges), got {vocab_size!r}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
    tokenizer.add_tokens(list(TAGS))  # whole tokens, but not "special": decoding keeps them
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(tokenizer, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """A small Llama-architecture causal LM sized for ``tokenizer``, randomly initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
