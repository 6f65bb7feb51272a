#!/usr/bin/env python
"""Build the training corpus: the selected Japanese plus English at a target share of TOKENS.

    python scripts/mix_corpus.py --japanese_files out/selection/selected.jsonl \\
        --english_files 'en/*.jsonl.gz' --tokenizer out/tokenizer --english_token_share 0.1 \\
        --output_dir out/mix

Tokens are counted with the tokenizer the model will be trained with (the extended one),
so "10% English" means 10% of what the model sees. All Japanese documents are used;
English documents are taken in file order until their tokens reach the share. Writes
OUT/train.jsonl (shuffled with --seed; each record keeps its fields plus "lang") and
OUT/mix_report.json (tokens, documents and characters per language, achieved share).
"""

import json
import os
import random
import time
from dataclasses import dataclass, field

from tqdm import tqdm
from transformers import AutoTokenizer, HfArgumentParser

from toolkit import assets
from toolkit.corpus import ReadStats, expand_paths, iter_records
from toolkit.reports import write_json_atomic


@dataclass
class MixArguments:
    japanese_files: list[str] = field(default_factory=list, metadata={"help": "Japanese JSONL(.gz) files or globs (all used)."})
    english_files: list[str] = field(default_factory=list, metadata={"help": "English JSONL(.gz) files or globs (taken in order)."})
    tokenizer: str = field(default=None, metadata={"help": "The tokenizer the model will be trained with (folder, Hub id or offline: name)."})
    output_dir: str = field(default=None, metadata={"help": "Where train.jsonl and mix_report.json go."})
    english_token_share: float = field(default=0.1, metadata={"help": "English share of all tokens (0 <= share < 1)."})
    allow_lower_english_share: bool = field(default=False, metadata={
        "help": "If the English files run out before the share is reached, use them all and report the lower share "
                "instead of stopping with an error."})
    seed: int = field(default=0, metadata={"help": "Seed of the shuffle (same seed, same output)."})
    text_field: str = field(default="text", metadata={"help": "The JSON field holding the text."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Count and skip malformed lines (reported)."})
    batch_size: int = field(default=256, metadata={"help": "Documents per tokenizer call."})


def count_tokens(tokenizer, texts):
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def read_side(paths, lang, tokenizer, args, stats, token_budget=None):
    """(records with "lang", their token count, characters); stops once `token_budget` tokens are reached."""
    records, tokens, characters = [], 0, 0
    progress = tqdm(desc=f"tokenize {lang}", unit="doc", mininterval=1.0)

    def flush(batch):
        nonlocal tokens, characters
        for record, count in zip(batch, count_tokens(tokenizer, [r[args.text_field] for r in batch])):
            if token_budget is not None and tokens >= token_budget:
                return True
            records.append({**record, "lang": lang})
            tokens += count
            characters += len(record[args.text_field])
        progress.update(len(batch))
        return token_budget is not None and tokens >= token_budget

    batch = []
    for path in paths:
        for _, record in iter_records(path, args.text_field, args.skip_bad_records, stats):
            batch.append(record)
            if len(batch) >= args.batch_size:
                if flush(batch):
                    progress.close()
                    return records, tokens, characters
                batch = []
    if batch:
        flush(batch)
    progress.close()
    return records, tokens, characters


def main(argv=None):
    (args,) = HfArgumentParser(MixArguments).parse_args_into_dataclasses(args=argv)
    if not args.japanese_files or not args.tokenizer or not args.output_dir:
        raise SystemExit("--japanese_files, --tokenizer and --output_dir are required")
    if not 0 <= args.english_token_share < 1:
        raise SystemExit(f"--english_token_share must be in [0, 1), got {args.english_token_share}")
    if args.english_token_share > 0 and not args.english_files:
        raise SystemExit("--english_token_share > 0 needs --english_files")
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve(args.tokenizer))
    japanese_paths = expand_paths(args.japanese_files)
    english_paths = expand_paths(args.english_files) if args.english_files else []

    # 1. All Japanese documents, counted in tokens of the training tokenizer.
    ja_stats, en_stats = ReadStats(), ReadStats()
    japanese, ja_tokens, ja_chars = read_side(japanese_paths, "ja", tokenizer, args, ja_stats)
    if ja_tokens == 0:
        raise SystemExit(f"no Japanese text in {japanese_paths}")

    # 2. English until its tokens are `share` of the total: en = share / (1 - share) * ja.
    english_needed = args.english_token_share / (1 - args.english_token_share) * ja_tokens
    english, en_tokens, en_chars = ([], 0, 0)
    if english_needed > 0:
        english, en_tokens, en_chars = read_side(english_paths, "en", tokenizer, args, en_stats, english_needed)
    achieved = en_tokens / (ja_tokens + en_tokens)
    short = en_tokens < english_needed
    if short and not args.allow_lower_english_share:
        raise SystemExit(
            f"the English files {english_paths} hold {en_tokens:,} tokens, fewer than the {english_needed:,.0f} needed "
            f"for an English share of {args.english_token_share} (reached {achieved:.4f}); add English files, lower "
            f"--english_token_share, or pass --allow_lower_english_share to accept {achieved:.4f}")

    # 3. Shuffle and write.
    mixed = japanese + english
    random.Random(args.seed).shuffle(mixed)
    os.makedirs(args.output_dir, exist_ok=True)
    out_path = os.path.join(args.output_dir, "train.jsonl")
    temporary = os.path.join(args.output_dir, ".train.jsonl.tmp")
    with open(temporary, "w", encoding="utf-8") as stream:
        for record in mixed:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, out_path)

    report = {
        "stage": "mix",
        "inputs": {"japanese_files": japanese_paths, "english_files": english_paths,
                   "tokenizer": args.tokenizer, "tokenizer_path": assets.resolve(args.tokenizer),
                   "vocab_size": len(tokenizer)},
        "output": {"train": out_path},
        "settings": {"english_token_share": args.english_token_share, "seed": args.seed,
                     "allow_lower_english_share": args.allow_lower_english_share},
        "tokens": {"ja": ja_tokens, "en": en_tokens, "total": ja_tokens + en_tokens},
        "documents": {"ja": len(japanese), "en": len(english), "total": len(mixed)},
        "characters": {"ja": ja_chars, "en": en_chars},
        "characters_per_token": {"ja": round(ja_chars / ja_tokens, 3),
                                 "en": round(en_chars / en_tokens, 3) if en_tokens else None},
        "english_share": {"target": args.english_token_share, "achieved": round(achieved, 5),
                          "reached": not short, "english_tokens_needed": round(english_needed)},
        "skipped_bad_records": {"ja": dict(ja_stats.skipped), "en": dict(en_stats.skipped)},
        "timing_s": {"total": round(time.time() - started, 3)},
    }
    write_json_atomic(os.path.join(args.output_dir, "mix_report.json"), report)
    print(f"{len(japanese)} ja + {len(english)} en documents, {ja_tokens:,} + {en_tokens:,} tokens, "
          f"English share {achieved:.4f} (target {args.english_token_share}) -> {out_path}")


if __name__ == "__main__":
    main()
