"""Policies for the trainer: small local causal LMs for tests and demos, any Hugging Face causal LM for users.

``build_tokenizer`` trains a byte-level BPE tokenizer on local texts (nothing is downloaded); the answer
tags are ordinary added tokens, so they survive ``decode(skip_special_tokens=True)``. ``tiny_causal_lm``
builds a small Llama-architecture model from a config. ``load_policy`` takes a hub name or a local path.

``completion_offsets`` maps generated token ids back to character spans of the decoded completion, the
link between the segmenter's character spans and the policy's tokens.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"

#: A chat template for tokenizers that have none: the prompt, then the assistant's turn.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


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


def load_policy(name_or_path: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) of a Hugging Face causal LM: a hub name or a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def completion_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded completion and each generated token's character span in it.

    Special tokens (padding, end of sequence) get the empty span (0, 0). When re-tokenising the decoded
    text gives back the same ids (the usual case), the tokenizer's own offsets are used; otherwise each
    span is found by decoding growing prefixes, which is exact for any tokenizer.
    """
    ids = [int(t) for t in token_ids]
    special = set(tokenizer.all_special_ids)
    kept = [t for t in ids if t not in special]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"] == kept:
        spans = iter([tuple(o) for o in encoded["offset_mapping"]])
    else:
        prefix_spans, end = [], 0
        for k in range(1, len(kept) + 1):
            new_end = len(tokenizer.decode(kept[:k], skip_special_tokens=True))
            prefix_spans.append((end, new_end))
            end = new_end
        spans = iter(prefix_spans)
    return text, [(0, 0) if t in special else next(spans) for t in ids]
