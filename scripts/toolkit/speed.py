"""Decoding speed of the ablation's arms, measured on the same text for every arm.

- Speed: forced decoding. Every arm decodes the same fixed reference texts: the prompt, then
  the reference continuation fed one token at a time through `generate` with its KV cache
  (greedy; a logits processor makes the reference token the greedy choice), the same batch
  and device for every arm, timed in interleaved rounds. The figure is reference characters
  per second: every arm covers the same characters, so the figure is (tokens/s) x (characters
  per token of the tokenizer on that text), the practical gain of a denser tokenizer.
  Characters/s of free generation would instead measure what each model chose to write
  (ASCII code, repeated "1. 1. 1."), so no speed is computed from it.
- Free generation, once per arm on the same prompts: a descriptive table of what each model
  wrote (characters/token written; U+FFFD from a multi-byte character cut by the budget is
  not a character and is excluded).
"""

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from toolkit.evaluation import CharacterBudget, left_padded, token_cap

REPLACEMENT = "\ufffd"


def split_prompt_and_reference(tokenizer, prompt, reference):
    """Token ids of prompt + reference tokenised whole (as the model reads the text): (prompt ids,
    reference ids), a token that straddles the boundary belonging to the reference."""
    encoded = tokenizer(prompt + reference, add_special_tokens=False, split_special_tokens=True,
                        return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    first = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    return ids[:first], ids[first:]


class ForceReference(LogitsProcessor):
    """Makes row r's k-th new token the k-th reference token of row r (then `end` once the row's
    reference is written, which finishes the row), so that greedy decoding writes the reference."""

    def __init__(self, references, prompt_width, end):
        width = max(map(len, references)) + 1
        self.table = torch.full((len(references), width), end, dtype=torch.long)
        for row, ids in enumerate(references):
            self.table[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.prompt_width = prompt_width

    def __call__(self, input_ids, scores):
        forced = self.table[:, input_ids.shape[1] - self.prompt_width].to(scores.device)
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(1, forced[:, None], 0.0)
        return chosen


class ForcedDecoder:
    """Forced decoding of fixed reference texts for one model: the unit that `forced_decoding_speeds` times."""

    def __init__(self, model, tokenizer, prompts, references, batch_size):
        self.model = model
        self.end = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.end
        self.device = next(model.parameters()).device
        self.batches, self.references = [], []
        for first in range(0, len(prompts), batch_size):
            pairs = [split_prompt_and_reference(tokenizer, p, r)
                     for p, r in zip(prompts[first:first + batch_size], references[first:first + batch_size])]
            ids, mask = left_padded([[start] + prompt_ids for prompt_ids, _ in pairs], self.pad)
            self.batches.append((ids, mask, [reference_ids for _, reference_ids in pairs]))
            self.references += [reference_ids for _, reference_ids in pairs]
        self.tokens = sum(map(len, self.references))
        self.characters = sum(map(len, references))

    @torch.no_grad()
    def warm_up(self, steps=4):
        """A few forced steps per batch: first-call allocations and kernel selection are not speed."""
        for ids, mask, references in self.batches:
            force = ForceReference(references, ids.shape[1], self.end)
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                max_new_tokens=steps, do_sample=False, eos_token_id=self.end, pad_token_id=self.pad,
                                logits_processor=LogitsProcessorList([force]))

    @torch.no_grad()
    def __call__(self, check=False):
        """Seconds for all batches; with `check`, also checks (after the clock stops) that every row
        wrote its reference."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        outputs = []
        for ids, mask, references in self.batches:
            force = ForceReference(references, ids.shape[1], self.end)
            output = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         max_new_tokens=force.table.shape[1], do_sample=False, eos_token_id=self.end,
                                         pad_token_id=self.pad, logits_processor=LogitsProcessorList([force]))
            outputs.append((output[:, ids.shape[1]:].tolist(), references))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        if check:
            for rows, references in outputs:
                for row, reference in zip(rows, references):
                    if row[: len(reference)] != reference:
                        raise RuntimeError("forced decoding did not write the reference tokens")
        return seconds


def forced_decoding_speeds(arms, prompts, references, batch_size=8, repeats=3):
    """Reference characters and tokens per second of every arm ({name: (model, tokenizer)}) decoding
    the same (prompt, reference) texts. A short warm-up per arm, then `repeats` rounds timing every
    arm once each in rotating order, so that a shared machine's load drifts over all arms alike
    (the first round also checks that every row wrote its reference); the median round per arm
    is reported."""
    if len(prompts) != len(references) or not prompts:
        raise ValueError(f"forced decoding needs one reference per prompt, got {len(prompts)} and {len(references)}")
    decoders = {name: ForcedDecoder(model, tokenizer, prompts, references, batch_size)
                for name, (model, tokenizer) in arms.items()}
    for decoder in decoders.values():
        decoder.warm_up()
    rounds = {name: [] for name in decoders}
    names = list(decoders)
    for round_number in range(repeats):
        for name in names[round_number % len(names):] + names[: round_number % len(names)]:
            rounds[name].append(decoders[name](check=round_number == 0))
    speeds = {}
    for name, timed in rounds.items():
        decoder, seconds = decoders[name], sorted(timed)[len(timed) // 2]
        speeds[name] = {"characters_per_second": decoder.characters / seconds,
                        "tokens_per_second": decoder.tokens / seconds,
                        "characters_per_token": decoder.characters / decoder.tokens,  # the tokenizer on this text
                        "seconds": seconds, "characters": decoder.characters, "tokens": decoder.tokens,
                        "prompts": len(prompts), "reference_characters": max(map(len, references)),
                        "batch_size": batch_size, "repeats": repeats, "device": str(decoder.device),
                        "rounds_seconds": timed, "method": "forced decoding of reference text"}
    return speeds


def speed_ratio(speeds, minuend, subtrahend):
    """The minuend's reference characters/s over the subtrahend's, with its two factors:
    tokens/s ratio x characters/token ratio (equal to it: both arms decode the same characters)."""
    a, b = speeds[minuend], speeds[subtrahend]
    return {"characters_per_second": a["characters_per_second"] / b["characters_per_second"],
            "tokens_per_second": a["tokens_per_second"] / b["tokens_per_second"],
            "characters_per_token": a["characters_per_token"] / b["characters_per_token"]}


class GreedyWriter:
    """Greedy generation of `new_characters` characters after each prompt (raw text after BOS)
    for one model, EOS and special tokens suppressed: EOS would end the text and a chat marker
    writes no characters, so pad only marks a row that already reached the budget."""

    def __init__(self, model, tokenizer, prompts, new_characters, batch_size):
        self.model, self.tokenizer, self.new_characters = model, tokenizer, new_characters
        eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.suppressed = sorted({eos, self.pad, *tokenizer.all_special_ids})
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.device = next(model.parameters()).device
        self.batches = [left_padded([[start] + tokenizer(p, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                                     for p in prompts[first:first + batch_size]], self.pad)
                        for first in range(0, len(prompts), batch_size)]
        self.texts = []

    @torch.no_grad()
    def __call__(self):
        """(seconds, characters written, tokens written); the texts are in `self.texts`. U+FFFD (a
        multi-byte character cut by the budget) is not counted as a character."""
        began = time.perf_counter()
        outputs = []
        for ids, mask in self.batches:
            budget = CharacterBudget(self.tokenizer, ids.shape[1], self.new_characters)
            output = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         max_new_tokens=token_cap(self.new_characters), do_sample=False,
                                         pad_token_id=self.pad, suppress_tokens=self.suppressed,
                                         stopping_criteria=StoppingCriteriaList([budget]))
            outputs.append(output[:, ids.shape[1]:].tolist())
        seconds = time.perf_counter() - began
        self.texts, tokens = [], 0
        for rows in outputs:
            for row in rows:
                written = row[: row.index(self.pad)] if self.pad in row else row
                self.texts.append(self.tokenizer.decode(written, skip_special_tokens=True))
                tokens += len(written)
        characters = sum(len(text) - text.count(REPLACEMENT) for text in self.texts)
        return seconds, characters, tokens


def free_generation(model, tokenizer, prompts, new_characters, batch_size=8):
    """What a model writes by itself on the prompts, once: descriptive only (no speed is computed
    from it). {"texts", "characters", "tokens", "characters_per_token", "replacement_characters", ...}."""
    writer = GreedyWriter(model, tokenizer, prompts, new_characters, batch_size)
    _, characters, tokens = writer()
    return {"texts": writer.texts, "characters": characters, "tokens": tokens,
            "characters_per_token": characters / max(tokens, 1),
            "replacement_characters": sum(text.count(REPLACEMENT) for text in writer.texts),
            "prompts": len(prompts), "new_characters": new_characters, "batch_size": batch_size}
