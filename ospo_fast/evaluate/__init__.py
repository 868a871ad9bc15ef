"""Coalition-masked evaluation: the value of every coalition of every response of a batch, in one call.

The value of coalition S of a response is the reward of ``coalition_text(sg, S)``. Two kinds of reward:

* **text rewards** — any ``reward(texts, owners) -> float [N]`` (BM25, a Python metric, an LLM judge): all
  distinct ``(owner, coalition text)`` pairs of the batch are built and scored in one call;
* **encoder rewards** — :class:`~ospo_fast.rewards.DenseRetrievalReward`: each distinct response is tokenised
  once by the encoder's tokenizer; each coalition keeps the tokens of its segments and of the text between
  adjacent kept segments (the tokens of its coalition text); the kept tokens of all
  coalitions are packed into one variable-length batch (``cu_seqlens``, no padding) and embedded in one
  forward; pooling, scoring against the pool and the metric run on the device for all coalitions at once.

Duplicates are evaluated once: responses with the same text share their coalitions, and the empty
coalition (``[CLS] [SEP]`` for an encoder) is embedded once for the whole batch.

The package, one concern per module, in the order the data flows:

* ``layout``: :class:`CoalitionBatch` (which coalitions of which responses), :class:`PackedLayout` (the host
  arrays of one packed evaluation) and the split into forwards of bounded size;
* ``text``: :func:`evaluate_text_reward`, one call of a text reward, its output checked;
* ``packing``: :class:`PackedSequences` and :func:`pack_coalitions` (torch reference and Triton kernel);
* ``encoder``: :class:`PackedBertForward`, the BERT forward on packed sequences, and :func:`pool_packed`;
* ``evaluator``: :class:`EncoderCoalitionEvaluator`, tokenisation, layout and the device half together, and
  :func:`packed_support`, whether it can run for a reward.

Backends (packing, pooling, attention, normalisation) are chosen in :mod:`ospo_fast.dispatch`.
"""

from .encoder import ATTENTIONS, PACKED_DTYPES, PackedBertForward, check_packed_options, pool_packed
from .evaluator import EncoderCoalitionEvaluator, packed_support
from .layout import CoalitionBatch, PackedLayout
from .packing import PackedSequences, pack_coalitions, pack_coalitions_reference
from .text import evaluate_text_reward

__all__ = [
    "ATTENTIONS",
    "PACKED_DTYPES",
    "CoalitionBatch",
    "EncoderCoalitionEvaluator",
    "PackedBertForward",
    "PackedLayout",
    "PackedSequences",
    "check_packed_options",
    "evaluate_text_reward",
    "pack_coalitions",
    "pack_coalitions_reference",
    "packed_support",
    "pool_packed",
]
