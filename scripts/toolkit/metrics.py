"""Tokenizer-independent language-model metrics.

Perplexity per token is not comparable across vocabularies: a tokenizer that packs
2.4 characters into a token raises per-token loss while predicting the same text just
as well. Bits per character (and per UTF-8 byte) divide the total negative
log-likelihood of a text by its length in characters (bytes), so models with different
tokenizers are compared on the same quantity.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class BitsPerCharacter:
    nll_nats: float  # summed negative log-likelihood of all scored tokens
    characters: int
    utf8_bytes: int
    tokens: int

    @property
    def bits_per_character(self) -> float:
        return self.nll_nats / math.log(2) / max(self.characters, 1)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / max(self.utf8_bytes, 1)

    @property
    def characters_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)

    def as_dict(self) -> dict:
        return {
            "bits_per_character": self.bits_per_character,
            "bits_per_byte": self.bits_per_byte,
            "characters_per_token": self.characters_per_token,
            "nll_nats": self.nll_nats,
            "characters": self.characters,
            "utf8_bytes": self.utf8_bytes,
            "tokens": self.tokens,
        }


def token_ids_with_bos(tokenizer, text):
    """Token ids of `text` preceded by exactly one BOS (or EOS for tokenizers without BOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has neither a BOS nor an EOS token to start a text")
    return [start] + ids


@torch.no_grad()
def text_nll(model, ids, max_length=1024, stride=None):
    """Summed NLL (nats) of ids[1:] given their prefixes, with a sliding window.

    Windows of `max_length` tokens advance by `stride` (default half a window); each
    token is scored once, with at least max_length - stride tokens of context once the
    text is longer than a window.
    """
    stride = stride or max_length // 2
    device = next(model.parameters()).device
    total, scored_until = 0.0, 1  # position 0 (BOS) is context only
    start = 0
    while scored_until < len(ids):
        end = min(start + max_length, len(ids))
        window = torch.tensor([ids[start:end]], device=device)
        logits = model(input_ids=window).logits[0, :-1].float()
        targets = window[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        first_new = scored_until - start - 1  # index into losses of the first unscored token
        total += losses[first_new:].sum().item()
        scored_until = end
        start = max(end - (max_length - stride), start + 1) if end < len(ids) else end
    return total


def bits_per_character(model, tokenizer, texts, max_length=1024) -> BitsPerCharacter:
    """Bits per character and per byte of `texts` under `model` with its `tokenizer`."""
    result = BitsPerCharacter(0.0, 0, 0, 0)
    for text in texts:
        if not text:
            continue
        ids = token_ids_with_bos(tokenizer, text)
        result.nll_nats += text_nll(model, ids, max_length=max_length)
        result.characters += len(text)
        result.utf8_bytes += len(text.encode("utf-8"))
        result.tokens += len(ids) - 1
    return result


def count_windows(num_ids, max_length=1024, stride=None) -> int:
    """How many forward passes `text_nll` makes for `num_ids` ids (same window arithmetic).

    Distributed evaluation needs it up front: under ZeRO-3 every process must run the same
    number of forward passes, so processes with less text add padding passes.
    """
    stride = stride or max_length // 2
    calls, scored_until, start = 0, 1, 0
    while scored_until < num_ids:
        end = min(start + max_length, num_ids)
        calls += 1
        scored_until = end
        start = max(end - (max_length - stride), start + 1) if end < num_ids else end
    return calls
