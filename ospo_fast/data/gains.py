"""Graded gains of the datasets' relevance labels (no pandas: the rewards' callers map labels with it)."""

from __future__ import annotations

from typing import Dict

__all__ = ["ESCI_GAINS", "esci_gain"]

#: Graded gains of the ESCI labels (Exact, Substitute, Complement, Irrelevant), as in the OSPO paper.
ESCI_GAINS: Dict[str, float] = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}

_ESCI_WORDS = {"exact": "E", "substitute": "S", "complement": "C", "irrelevant": "I"}


def esci_gain(label: str) -> float:
    """Gain of one ESCI label.

    Accepts the letters ``E/S/C/I`` and the words ``Exact/Substitute/Complement/Irrelevant``, in any case,
    surrounding whitespace ignored. Raises ``ValueError`` for anything else.
    """
    if not isinstance(label, str):
        raise ValueError(f"label: expected an ESCI label string, got {type(label).__name__}")
    key = label.strip()
    letter = _ESCI_WORDS.get(key.lower(), key.upper())
    if letter not in ESCI_GAINS:
        raise ValueError(
            f"label: unknown ESCI label {label!r}; expected one of E/S/C/I or "
            "Exact/Substitute/Complement/Irrelevant"
        )
    return ESCI_GAINS[letter]
