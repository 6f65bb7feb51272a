"""Tokenizer-independent language-model metrics.

Perplexity per token is not comparable across vocabularies: a tokenizer that packs
2.4 characters into a token raises per-token loss while predicting the same text just
as well. Bits per character (and per UTF-8 byte) divide the total negative
log-likelihood of a text by its length in characters (bytes), so models with different
tokenizers are compared on the same quantity.

The context window can be set in characters too (`window_characters`): a window of N
tokens holds ~2.5x more Japanese text for an extended tokenizer than for the raw base,
which would give the extended model more context for the same figure.

Text is data: a document that spells "<s>" is scored as those characters, never as the
special token (`split_special_tokens=True`).
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


def start_token_id(tokenizer):
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has neither a BOS nor an EOS token to start a text")
    return start


def token_ids_with_bos(tokenizer, text):
    """Token ids of `text` preceded by exactly one BOS (or EOS for tokenizers without BOS)."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [start_token_id(tokenizer)] + ids


def character_windows(starts, ends, window_characters, stride_characters=None):
    """Token windows [start, end) of ids whose text spans at most `window_characters`.

    `starts[i]`, `ends[i]`: the character span of ids[i] (BOS: 0, 0). Like `text_nll`'s token
    windows: each id is scored once, and a new window keeps the last
    window_characters - stride_characters characters (default half) as context.
    """
    stride_characters = stride_characters or window_characters // 2
    windows, start, scored_until = [], 0, 1
    while scored_until < len(ends):
        end = start + 2  # at least one scored token
        while end < len(ends) and ends[end] - starts[start] <= window_characters:
            end += 1
        end = max(end, scored_until + 1)
        windows.append((start, end))
        scored_until = end
        if end < len(ends):
            keep_from = ends[end - 1] - (window_characters - stride_characters)
            start = max(next(i for i in range(start, end) if starts[i] >= keep_from or i == end - 1), start + 1)
    return windows


def token_windows(num_ids, max_length=1024, stride=None):
    """Token windows [start, end): `max_length` tokens advancing by `stride` (default half)."""
    stride = stride or max_length // 2
    windows, scored_until, start = [], 1, 0
    while scored_until < num_ids:
        end = min(start + max_length, num_ids)
        windows.append((start, end))
        scored_until = end
        start = max(end - (max_length - stride), start + 1) if end < num_ids else end
    return windows


@torch.no_grad()
def text_nll(model, ids, max_length=1024, stride=None, windows=None):
    """Summed NLL (nats) of ids[1:] given their prefixes, with a sliding window.

    Windows of `max_length` tokens advance by `stride` (default half a window); each
    token is scored once, with at least max_length - stride tokens of context once the
    text is longer than a window. `windows` (e.g. from `character_windows`) replaces them.
    """
    device = next(model.parameters()).device
    total, scored_until = 0.0, 1  # position 0 (BOS) is context only
    for start, end in windows or token_windows(len(ids), max_length, stride):
        window = torch.tensor([ids[start:end]], device=device)
        logits = model(input_ids=window).logits[0, :-1].float()
        targets = window[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        first_new = scored_until - start - 1  # index into losses of the first unscored token
        total += losses[first_new:].sum().item()
        scored_until = end
    return total


def bits_per_character(model, tokenizer, texts, max_length=1024, window_characters=None) -> BitsPerCharacter:
    """Bits per character and per byte of `texts` under `model` with its `tokenizer`.

    The context window is `max_length` tokens, or `window_characters` characters of text
    (the same context for every tokenizer) when given.
    """
    result = BitsPerCharacter(0.0, 0, 0, 0)
    for text in texts:
        if not text:
            continue
        windows = None
        if window_characters:
            encoding = tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True)
            ids = [start_token_id(tokenizer)] + encoding["input_ids"]
            spans = [(0, 0)] + [tuple(span) for span in encoding["offset_mapping"]]
            windows = character_windows([a for a, _ in spans], [b for _, b in spans], window_characters)
        else:
            ids = token_ids_with_bos(tokenizer, text)
        result.nll_nats += text_nll(model, ids, max_length=max_length, windows=windows)
        result.characters += len(text)
        result.utf8_bytes += len(text.encode("utf-8"))
        result.tokens += len(ids) - 1
    return result


def count_windows(num_ids, max_length=1024, stride=None) -> int:
    """How many forward passes `text_nll` makes for `num_ids` ids (same window arithmetic).

    Distributed evaluation needs it up front: under ZeRO-3 every process must run the same
    number of forward passes, so processes with less text add padding passes.
    """
    return len(token_windows(num_ids, max_length, stride))
