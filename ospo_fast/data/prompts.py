"""Prompt templates for the search tasks, and answer extraction from completions.

Templates are plain ``str.format`` strings with named fields. A user passes their own with
``template="..."``; :func:`check_template` rejects fields the task does not provide, naming them.

>>> chat(render(ESCI_TEMPLATE, "esci", request="mama koala"), ESCI_SYSTEM, ESCI_WORKED_EXAMPLES)[-1]
{'role': 'user', 'content': 'mama koala'}
>>> extract_answer("<think>short</think><answer>red trail running shoes</answer>")
'red trail running shoes'
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

__all__ = [
    "ESCI_TEMPLATE",
    "ESCI_SYSTEM",
    "ESCI_WORKED_EXAMPLES",
    "HM_TEMPLATE",
    "TEMPLATE_FIELDS",
    "check_template",
    "render",
    "chat",
    "extract_answer",
    "follows_format",
    "MAX_QUERY_WORDS",
]

#: The ESCI task's user message: the shopper's request itself. The instructions are in the system message
#: and a worked example precedes it as an earlier exchange (what a small instruct model follows best:
#: SmolLM2-135M-Instruct copies a worked example written inside the user message).
ESCI_TEMPLATE = "{request}"

ESCI_SYSTEM = (
    "You rewrite a shopper's request as a product search query: short phrases separated by commas "
    "(the product type, its attributes, its use)."
)

#: (request, query) exchanges shown before the request, with the default template.
ESCI_WORKED_EXAMPLES = (("running shoes", "running shoes, lightweight, breathable mesh, cushioned sole"),)

HM_TEMPLATE = (
    "A customer of a fashion store bought these items, oldest first:\n"
    "\n"
    "{history}\n"
    "\n"
    "Describe the next item they will buy as short phrases separated by commas (product type, colour, "
    "material, style), so that a search engine can match it against the store's catalogue. Answer with the "
    "description only."
)

#: Answers longer than this many words are not a search query (a policy rambling or repeating itself).
MAX_QUERY_WORDS = 32

#: The fields each task fills in its template.
TEMPLATE_FIELDS: Dict[str, FrozenSet[str]] = {
    # request: the shopper's (under-specified) query.
    "esci": frozenset({"request"}),
    # history: the recent items, one "- text" line each; num_items: how many; age: the customer's age or "unknown".
    "hm": frozenset({"history", "num_items", "age"}),
}


#: The field that makes each sample's prompt its own: a template without it gives every sample the same prompt.
REQUIRED_FIELDS: Dict[str, str] = {"esci": "request", "hm": "history"}


def check_template(template: str, task: str) -> str:
    """Validate a template for ``task`` ("esci" or "hm"); returns it.

    Raises:
        ValueError: not a str, malformed braces, a positional field (``{}``, ``{0}``), fields the task does
            not provide (named, with the allowed ones), or no :data:`REQUIRED_FIELDS` field.
    """
    if task not in TEMPLATE_FIELDS:
        raise ValueError(f"task: expected one of {sorted(TEMPLATE_FIELDS)}, got {task!r}")
    if not isinstance(template, str):
        raise ValueError(f"template: expected a format string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template: not a valid format string ({e}); write literal braces as {{{{ and }}}}") from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split(".")[0].split("[")[0]
        if root == "" or root.isdigit():
            raise ValueError(f"template: positional field {{{name}}}; use named fields {sorted(TEMPLATE_FIELDS[task])}")
        fields.append(root)
    unknown = sorted(set(fields) - TEMPLATE_FIELDS[task])
    if unknown:
        raise ValueError(
            f"template: unknown field(s) {unknown} for the {task} task; available: {sorted(TEMPLATE_FIELDS[task])}"
        )
    required = REQUIRED_FIELDS[task]
    if required not in fields:
        raise ValueError(f"template: has no {{{required}}} field, so every prompt of the {task} task would be the same "
                         f"text; put {{{required}}} where each sample's own text goes")
    return template


def render(template: str, task: str, **fields) -> str:
    """Fill a checked template with the task's ``fields`` (all of them; a template may use a subset)."""
    return check_template(template, task).format(**fields)


def chat(text: str, system: Optional[str] = None,
         worked_examples: Sequence[Tuple[str, str]] = ()) -> List[Dict[str, str]]:
    """A chat-style message list: an optional system message, ``worked_examples`` as earlier (user,
    assistant) exchanges, then ``text`` as the user message."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in worked_examples:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": text})
    return messages


@lru_cache(maxsize=1)
def _segmenter():
    from ..segment import Segmenter

    return Segmenter()


def extract_answer(completion: str) -> str:
    """The answer of a completion, stripped: the text inside the first ``<answer>...</answer>``; without an
    answer tag, the text after ``</think>``; without either, the whole text.

    The same rule the segmenter uses (:meth:`ospo_fast.Segmenter.answer_span`): the grand coalition's text is
    this answer from its first segment to its last (punctuation before the first and after the last
    dropped). An unclosed ``<think>`` with no answer tag (a
    completion cut off while thinking) gives ``""``; an answer tag never closed runs to the end of the text.
    """
    if not isinstance(completion, str):
        raise ValueError(f"completion: expected a str, got {type(completion).__name__}")
    lo, hi = _segmenter().answer_span(completion)
    return completion[lo:hi].strip()


_CLOSED_ANSWER = re.compile(r"<answer>\s*\S.*?</answer>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"</?(think|answer)>", re.IGNORECASE)


def follows_format(completion: str) -> bool:
    """True when the completion is an answer in the format the prompts ask for (what the training logs and
    reports count as the format rate):

    - a completion with ``<think>``/``<answer>`` tags: a non-empty answer closed by its tag;
    - without tags (the whole completion is the answer): one non-empty line of at most
      :data:`MAX_QUERY_WORDS` words.
    """
    if not isinstance(completion, str):
        raise ValueError(f"completion: expected a str, got {type(completion).__name__}")
    if _TAG.search(completion):
        return _CLOSED_ANSWER.search(completion) is not None
    answer = completion.strip()
    return bool(answer) and "\n" not in answer and len(answer.split()) <= MAX_QUERY_WORDS
