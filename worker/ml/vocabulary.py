"""Does the model's vocabulary cover the data? The share of unknown tokens in a sample.

An English uncased BERT turns most Chinese characters into ``[UNK]``: it then learns from, and
labels, texts it cannot read. Jobs check a sample when they start and warn above a threshold.
"""

from __future__ import annotations

from typing import Any

SAMPLE_TEXTS = 200
WARN_ABOVE = 0.10
MULTILINGUAL = "bert-base-multilingual-cased or xlm-roberta-base"


def unknown_share(tokenizer: Any, texts: list[str]) -> float | None:
    """Unknown tokens over all tokens in the first ``SAMPLE_TEXTS`` texts; ``None`` for a
    tokenizer without an unknown token (byte-level BPE reads anything)."""
    unknown = tokenizer.unk_token_id
    sample = [text for text in texts[:SAMPLE_TEXTS] if text]
    if unknown is None or not sample:
        return None
    encoded = tokenizer(sample, add_special_tokens=False, truncation=True, max_length=512)
    total = sum(len(ids) for ids in encoded["input_ids"])
    hits = sum(ids.count(unknown) for ids in encoded["input_ids"])
    return hits / total if total else None


def vocabulary_warning(model: str, share: float | None) -> str | None:
    """The warning for a sample with ``share`` unknown tokens, or ``None`` if it is fine."""
    if share is None or share <= WARN_ABOVE:
        return None
    return (
        f"{share:.0%} of the tokens in a sample of the data are unknown to the vocabulary of "
        f"{model} ([UNK]): the model cannot read most of this text, and its results will be "
        f"guesses. Use a model whose vocabulary covers the language, such as a multilingual "
        f"one ({MULTILINGUAL})"
    )
