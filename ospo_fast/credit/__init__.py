"""The credit stage: from a policy's completion ids to Owen-value credit on each token, and from that credit and
each response's advantage to per-token advantages. Every trainer (``OSPOTrainer``, TRL, verl, your own) calls
the two functions at the ends of this module::

    completion ids [N, T] --attribute_completions--> CompletionCredit (texts, Owen values, credit [N, T])
    sequence advantages [N] + credit --token_advantages--> per-token advantages [N, T] --> the loss

Underneath, three maps: ``completion_offsets`` (ids -> decoded text and each token's character span),
``token_player_map(s)`` (character spans -> the segment of each token, for the tokens of any Hugging Face fast
tokenizer) and ``spread_credit`` (each segment's credit spread evenly over its tokens). The credit of a segment
is its *excess* Owen value (:func:`excess_credit`), which carries nothing of the reward itself; why is in
docs/credit.md. New credit modes are added here, once.
"""

from __future__ import annotations

from .completions import CompletionCredit, attribute_completions, token_advantages
from .spread import TokenCredit, credit_on_tokens, excess_credit, segment_worth, spread_credit
from .token_maps import completion_offsets, token_player_map, token_player_maps

__all__ = [
    "CompletionCredit",
    "TokenCredit",
    "attribute_completions",
    "completion_offsets",
    "credit_on_tokens",
    "excess_credit",
    "segment_worth",
    "spread_credit",
    "token_advantages",
    "token_player_map",
    "token_player_maps",
]
