#!/usr/bin/env python
"""Extend a base tokenizer with Japanese pieces learned on Japanese text.

    python scripts/extend_tokenizer.py --base_tokenizer offline:mistral-7b-tokenizer \
        --train_files selected.jsonl --eval_files ja_eval.jsonl.gz en_eval.jsonl.gz \
        --vocab_size 120000 --output_dir outputs/tokenizer

Trains a BPE with the `tokenizers` library on the Japanese text, with the base's own
normaliser and pre-tokenisation, and appends its tokens and merges to the base (see
`toolkit/tokenizer_extension.py`): base ids, strings, merges and special tokens are
unchanged, so the base model's embeddings stay valid for every base token. By default
only new tokens containing Japanese script are kept, so English segmentation cannot change.

--vocab_size is the total after extension, rounded up to a multiple of
--pad_to_multiple_of (64 by default, the multiple the model side pads embeddings to), so
the embedding matrix needs no unused rows. If the text is too small to learn that many
tokens, the result keeps what it could learn and says so in the report and on stderr.

For a SentencePiece base (Llama 2, Mistral) it also writes tokenizer.model: the base's
SentencePiece model with the new pieces appended (scores below every base score, in merge
order), which llama.cpp's GGUF converter and `sentencepiece` read; it is checked to give
the same ids as tokenizer.json. Text from data is tokenised with special-token parsing
off: "<s>" in a document is three characters, never BOS.

The tokenizer is written and checked in a staging folder under OUT and moved into OUT
only when every check passes. Writes OUT (loads with AutoTokenizer.from_pretrained(OUT))
and OUT/tokenizer_report.json.
"""

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from tokenizers import Tokenizer
from transformers import AutoTokenizer, HfArgumentParser

from toolkit.corpus import ReadStats, expand_paths, iter_records
from toolkit.reports import write_json_atomic
from toolkit.text import japanese_char_ratio
from toolkit.tokenizer_extension import (
    ADVERSARIAL_TEXTS,
    SENTENCEPIECE,
    ExtensionError,
    base_size,
    characters_per_token,
    encoding_throughput,
    extended_sentencepiece_model,
    is_japanese_text,
    load_base_tokenizer,
    merge_into_base,
    round_trip_failures,
    tokenizer_family,
    train_bpe,
)
from toolkit.quiet import quiet_by_default

# Files a slow (non-tokenizers) class would read instead of tokenizer.json; they describe
# the base vocabulary only, so they are not copied to the extended tokenizer.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")


@dataclass
class ExtensionArguments:
    base_tokenizer: str = field(metadata={"help": "Hub id, local folder, or offline:NAME of the tokenizer to extend."})
    train_files: List[str] = field(metadata={"help": "Japanese JSONL(.gz) files (or globs) with a text field."})
    vocab_size: int = field(
        metadata={"help": "Total vocabulary size after extension (rounded up to --pad_to_multiple_of)."}
    )
    output_dir: str = field(metadata={"help": "Where the extended tokenizer and tokenizer_report.json go."})
    eval_files: List[str] = field(
        default_factory=list,
        metadata={"help": "Held-out JSONL(.gz) files to measure characters/token on (Japanese and English)."},
    )
    japanese_only_tokens: bool = field(
        default=True,
        metadata={"help": "Keep only new tokens containing Japanese script, so non-Japanese text segments as before."},
    )
    pad_to_multiple_of: int = field(
        default=64, metadata={"help": "Round the total up to a multiple of this (1: use --vocab_size exactly)."}
    )
    min_frequency: int = field(default=2, metadata={"help": "A pair must occur this often to become a token."})
    max_train_characters: int = field(
        default=0, metadata={"help": "Train on the first documents up to this many characters (0: all)."}
    )
    min_japanese_ratio: float = field(
        default=0.2, metadata={"help": "Each train file must be at least this share kana/kanji (non-space chars)."}
    )
    text_field: str = field(default="text", metadata={"help": "The JSON field holding the text."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Count and skip bad lines instead of failing."})


def read_training_text(args, stats):
    """Japanese training texts, checking each file is Japanese; up to max_train_characters."""
    texts, characters = [], 0
    for path in expand_paths(args.train_files):
        file_texts = []
        for _, record in iter_records(path, args.text_field, args.skip_bad_records, stats):
            if args.max_train_characters and characters >= args.max_train_characters:
                break
            text = record[args.text_field]
            file_texts.append(text)
            characters += len(text)
        ratio = japanese_char_ratio("".join(file_texts))
        if "".join(file_texts).strip() and ratio < args.min_japanese_ratio:
            raise ExtensionError(
                f"{path}: only {ratio:.1%} of its non-space characters are kana or kanji (at least "
                f"{args.min_japanese_ratio:.0%} expected); --train_files must be Japanese text"
            )
        texts += file_texts
    if not "".join(texts).strip():
        raise ExtensionError(f"{', '.join(args.train_files)}: no training text (every record is empty or blank)")
    return texts


def read_eval_files(args):
    evaluation = {}
    for path in expand_paths(args.eval_files):
        texts = [record[args.text_field] for _, record in iter_records(path, args.text_field, args.skip_bad_records)]
        evaluation[path] = texts
    return evaluation


def learn_new_tokens(base_json, family, texts, wanted, args):
    """Train, merge, and train a larger BPE while filtering leaves fewer tokens than wanted."""
    attempts = []
    train_size = 2 * wanted + 1000
    for _ in range(4):
        trained = train_bpe(base_json, family, texts, train_size, args.min_frequency)
        result = merge_into_base(base_json, family, trained, wanted, args.japanese_only_tokens)
        attempts.append({"requested": train_size, "learned": len(trained.tokens),
                         "tokens_kept": len(result.added_tokens), "seconds": round(trained.seconds, 2)})
        if len(result.added_tokens) >= wanted or trained.exhausted:
            return result, trained, attempts
        train_size *= 2
    return result, trained, attempts


def save_tokenizer(base, tokenizer_json, sentencepiece_model, output_dir: Path):
    """The base's files (config, special tokens, chat template) with the new tokenizer.json,
    and the new tokenizer.model (bytes, or None for a base that is not a SentencePiece model)."""
    base.save_pretrained(output_dir)
    for name in SLOW_TOKENIZER_FILES:
        (output_dir / name).unlink(missing_ok=True)
    Tokenizer.from_str(json.dumps(tokenizer_json)).save(str(output_dir / "tokenizer.json"))
    if sentencepiece_model is not None:
        (output_dir / "tokenizer.model").write_bytes(sentencepiece_model)
    config_path = output_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # A model-specific class (LlamaTokenizer, ...) rebuilds its pipeline from the vocabulary
    # in transformers 5; the generic class uses tokenizer.json exactly as written.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("is_local", None)
    config.pop("local_files_only", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sentencepiece_model_for(base, family, tokenizer_json):
    """(bytes of the extended tokenizer.model or None, why none) for llama.cpp and sentencepiece users."""
    if family != SENTENCEPIECE:
        return None, f"a {family} base: llama.cpp's converter reads tokenizer.json for byte-level BPE"
    if base.sentencepiece_model is None:
        return None, f"{base.name} ships no tokenizer.model to extend"
    try:
        return extended_sentencepiece_model(base.sentencepiece_model, tokenizer_json), None
    except ExtensionError as error:
        return None, str(error)


def sentencepiece_agreement(folder: Path, texts) -> dict:
    """Texts whose ids from tokenizer.model (sentencepiece itself) differ from tokenizer.json's."""
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # sentencepiece never reads "<s>" in text as a control token
    differ = [text for text in texts if tokenizer.encode(text, add_special_tokens=False).ids != reference.encode(text)]
    return {"written": True, "pieces": reference.get_piece_size(), "texts_checked": len(texts),
            "ids_differ": len(differ), "examples": [text[:80] for text in differ[:5]]}


def move_into(staging: Path, output_dir: Path):
    """The checked tokenizer files from `staging` into `output_dir`, each by an atomic rename."""
    for name in SLOW_TOKENIZER_FILES:  # e.g. a tokenizer.model of an earlier run must not outlive it
        if not (staging / name).exists():
            (output_dir / name).unlink(missing_ok=True)
    for item in staging.iterdir():
        os.replace(item, output_dir / item.name)
    staging.rmdir()


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(ExtensionArguments).parse_args_into_dataclasses()
    started = time.perf_counter()
    output_dir = Path(args.output_dir)

    # The base, and the size to reach.
    base_tokenizer = load_base_tokenizer(args.base_tokenizer)
    base, base_json = base_tokenizer.tokenizer, base_tokenizer.tokenizer_json
    family = tokenizer_family(base_json, args.base_tokenizer)
    base_vocab_size = base_size(base_json)
    if args.vocab_size <= base_vocab_size:
        raise ExtensionError(
            f"--vocab_size {args.vocab_size} is not above the base's {base_vocab_size} tokens "
            f"({args.base_tokenizer}); it is the total after extension, e.g. {base_vocab_size + 8192}"
        )
    multiple = max(args.pad_to_multiple_of, 1)
    target_vocab_size = math.ceil(args.vocab_size / multiple) * multiple
    wanted = target_vocab_size - base_vocab_size
    read_stats = ReadStats()
    texts = read_training_text(args, read_stats)
    evaluation = read_eval_files(args)  # before training: a bad eval file fails in seconds, not after it

    # Train and merge, then save into a staging folder: nothing reaches --output_dir unchecked.
    print(f"training on {len(texts)} documents ({sum(map(len, texts)):,} characters) to add {wanted} tokens "
          f"to {args.base_tokenizer} ({family}, {base_vocab_size} tokens)", file=sys.stderr)
    training_started = time.perf_counter()
    result, trained, attempts = learn_new_tokens(base_json, family, texts, wanted, args)
    training_seconds = time.perf_counter() - training_started
    sentencepiece_model, no_sentencepiece_model = sentencepiece_model_for(base_tokenizer, family, result.tokenizer_json)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=output_dir))
    save_tokenizer(base, result.tokenizer_json, sentencepiece_model, staging)

    # Check and measure the saved tokenizer as users will load it.
    extended = AutoTokenizer.from_pretrained(str(staging))
    base_vocab, extended_vocab = base.get_vocab(), extended.get_vocab()
    moved_ids = [token for token, index in base_vocab.items() if extended_vocab.get(token) != index]
    all_eval_texts = [text for texts_of_file in evaluation.values() for text in texts_of_file]
    round_trip_texts = ADVERSARIAL_TEXTS + all_eval_texts
    new_failures = round_trip_failures(extended, round_trip_texts)
    if sentencepiece_model is not None:
        sentencepiece_report = sentencepiece_agreement(staging, round_trip_texts)
    else:
        sentencepiece_report = {"written": False, "reason": no_sentencepiece_model}
        if family == SENTENCEPIECE:
            print(f"note: no tokenizer.model written ({no_sentencepiece_model}); llama.cpp users need one",
                  file=sys.stderr)
    by_language = {"ja": {"base": [0, 0], "extended": [0, 0]}, "en": {"base": [0, 0], "extended": [0, 0]}}
    eval_report = {}
    for path, file_texts in evaluation.items():
        language = "ja" if is_japanese_text(file_texts) else "en"
        eval_report[path] = {"language": language}
        for name, tokenizer in (("base", base), ("extended", extended)):
            figures = characters_per_token(tokenizer, file_texts)
            eval_report[path][name] = figures
            by_language[language][name][0] += figures["characters"]
            by_language[language][name][1] += figures["tokens"]
    characters_per_token_summary = {
        language: {name: round(chars / tokens, 4) for name, (chars, tokens) in figures.items()}
        for language, figures in by_language.items() if figures["base"][1]
    }
    throughput_texts = all_eval_texts or texts[:200]
    base_speed = encoding_throughput(base, throughput_texts)
    extended_speed = encoding_throughput(extended, throughput_texts)

    shortfall = None
    if len(result.added_tokens) < wanted:
        shortfall = {
            "requested_vocab_size": target_vocab_size,
            "reached_vocab_size": base_vocab_size + len(result.added_tokens),
            "reason": f"the training text ({sum(map(len, texts)):,} characters) holds no more pairs occurring at "
                      f"least {args.min_frequency} times; train on more Japanese text to reach the requested size",
        }
        print(f"WARNING: learned only {len(result.added_tokens)} of the {wanted} new tokens requested: final "
              f"vocabulary {shortfall['reached_vocab_size']} instead of {target_vocab_size}. {shortfall['reason']}.",
              file=sys.stderr)
    problems = []
    if moved_ids:
        problems.append(f"{len(moved_ids)} base token(s) changed id (e.g. {moved_ids[0]!r})")
    if new_failures:
        problems.append(f"decode(encode(x)) != x for {len(new_failures)} texts")
    if sentencepiece_report.get("ids_differ"):
        problems.append(f"tokenizer.model and tokenizer.json give different ids on "
                        f"{sentencepiece_report['ids_differ']} texts")
    report = {
        "base_tokenizer": args.base_tokenizer,
        "base_tokenizer_resolved": base_tokenizer.resolved,
        "base_pipeline_from": base_tokenizer.source,
        "family": family,
        "train_files": args.train_files,
        "train_documents": len(texts),
        "train_characters": sum(map(len, texts)),
        "skipped_records": dict(read_stats.skipped),
        "japanese_only_tokens": args.japanese_only_tokens,
        "requested_vocab_size": args.vocab_size,
        "pad_to_multiple_of": multiple,
        "target_vocab_size": target_vocab_size,
        "base_vocab_size": base_vocab_size,
        "final_vocab_size": len(extended),
        "tokens_added": len(result.added_tokens),
        "merges_added": result.added_merges,
        "candidates_skipped": result.skipped,
        "shortfall": shortfall,
        "training_attempts": attempts,
        "training_seconds": round(training_seconds, 2),
        "characters_per_token": characters_per_token_summary,
        "eval": eval_report,
        "special_tokens_in_text": "text (split_special_tokens): '<s>' in a document is its characters, not BOS",
        "round_trip": {"texts_checked": len(round_trip_texts), "adversarial_texts": len(ADVERSARIAL_TEXTS),
                       "lossless": not new_failures, "failures": new_failures[:20]},
        "sentencepiece_model": sentencepiece_report,
        "encoding_throughput_mb_per_s": {"base": round(base_speed, 3), "extended": round(extended_speed, 3),
                                         "extended_over_base": round(extended_speed / base_speed, 3)},
        "problems": problems,
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    if problems:  # the tokenizer stays in the staging folder, out of the way of the next stage
        write_json_atomic(staging / "tokenizer_report.json", report)
        raise ExtensionError(
            f"{staging}: the extended tokenizer failed its checks ({'; '.join(problems)}), so it was not moved to "
            f"{output_dir}. This is a bug in the extension: please report it with {staging / 'tokenizer_report.json'}"
        )
    move_into(staging, output_dir)
    write_json_atomic(output_dir / "tokenizer_report.json", report)
    print(json.dumps({key: report[key] for key in ("base_vocab_size", "final_vocab_size", "tokens_added",
                                                    "characters_per_token", "encoding_throughput_mb_per_s")},
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
