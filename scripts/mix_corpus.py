#!/usr/bin/env python
"""Build the training corpus: the selected Japanese plus English at a target share of TOKENS.

    python scripts/mix_corpus.py --japanese_files out/selection/selected.jsonl \\
        --english_files 'en/*.jsonl.gz' --tokenizer out/tokenizer --english_token_share 0.1 \\
        --output_dir out/mix

Tokens are counted with the tokenizer the model will be trained with (the extended one),
so "10% English" means 10% of what the model sees. All Japanese documents are used;
English documents are taken in file order until their tokens reach the share. The
shuffle is two-pass (random bucket files, then each shuffled), so memory stays at one
bucket whatever the corpus size. Writes
OUT/train.jsonl (shuffled with --seed; each record keeps its fields plus "lang") and
OUT/mix_report.json (tokens, documents and characters per language, achieved share).
"""

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field

from tqdm import tqdm
from transformers import AutoTokenizer, HfArgumentParser

from toolkit import assets
from toolkit.corpus import CorpusError, ReadStats, iter_records
from toolkit.selection import resolve_inputs
from toolkit.reports import write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class MixArguments:
    japanese_files: list[str] = field(default_factory=list, metadata={"help": "Japanese JSONL(.gz) files or globs (all used)."})
    english_files: list[str] = field(default_factory=list, metadata={
        "help": "English JSONL(.gz) files, globs or hf://datasets/<org>/<name>/<pattern> (taken in order)."})
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
    shuffle_buckets: int = field(default=16, metadata={
        "help": "Temporary files of the two-pass shuffle; one of them must fit in memory (corpus size / this)."})


def count_tokens(tokenizer, texts):
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


class ShuffleBuckets:
    """A two-pass shuffle that never holds the whole corpus in memory: each line goes to one of
    `count` bucket files at random; then each bucket is shuffled in memory and appended."""

    def __init__(self, folder, count, rng):
        self.folder, self.rng = folder, rng
        os.makedirs(folder, exist_ok=True)
        self.paths = [os.path.join(folder, f"bucket_{i:04d}.jsonl") for i in range(count)]
        self.streams = [open(path, "w", encoding="utf-8") for path in self.paths]

    def add(self, line):
        self.streams[self.rng.randrange(len(self.streams))].write(line)

    def discard(self):
        for stream in self.streams:
            stream.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def write_shuffled(self, out_path):
        for stream in self.streams:
            stream.close()
        temporary = out_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            for path in tqdm(self.paths, desc="shuffle", unit="bucket"):
                with open(path, encoding="utf-8") as stream:
                    lines = stream.readlines()
                self.rng.shuffle(lines)
                out.writelines(lines)
                os.remove(path)
        os.rmdir(self.folder)
        os.replace(temporary, out_path)


def read_side(paths, lang, tokenizer, args, stats, sink, token_budget=None):
    """Send each record (plus "lang") to `sink`; returns (documents, tokens, characters).
    With `token_budget`, stops at the first document that brings the tokens to the budget."""
    documents, tokens, characters = 0, 0, 0
    progress = tqdm(desc=f"tokenize {lang}", unit="doc", mininterval=1.0)

    def flush(batch):
        nonlocal documents, tokens, characters
        for record, count in zip(batch, count_tokens(tokenizer, [r[args.text_field] for r in batch])):
            if token_budget is not None and tokens >= token_budget:
                return True
            sink(json.dumps({**record, "lang": lang}, ensure_ascii=False) + "\n")
            documents += 1
            tokens += count
            characters += len(record[args.text_field])
        progress.update(len(batch))
        return token_budget is not None and tokens >= token_budget

    batch, done = [], False
    for path in paths:
        for _, record in iter_records(path, args.text_field, args.skip_bad_records, stats):
            batch.append(record)
            if len(batch) >= args.batch_size:
                done, batch = flush(batch), []
                if done:
                    break
        if done:
            break
    if batch and not done:
        flush(batch)
    progress.close()
    return documents, tokens, characters


def main(argv=None):
    quiet_by_default(argv)  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(MixArguments).parse_args_into_dataclasses(args=argv)
    if not args.japanese_files or not args.tokenizer or not args.output_dir:
        raise SystemExit("--japanese_files, --tokenizer and --output_dir are required")
    if not 0 <= args.english_token_share < 1:
        raise SystemExit(f"--english_token_share must be in [0, 1), got {args.english_token_share}")
    if args.english_token_share > 0 and not args.english_files:
        raise SystemExit("--english_token_share > 0 needs --english_files")
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve(args.tokenizer))
    japanese_paths = resolve_inputs(args.japanese_files)  # local files, globs or hf://datasets/<id>/<pattern>
    english_paths = resolve_inputs(args.english_files) if args.english_files else []

    # 1. All Japanese documents, counted in tokens of the training tokenizer, into the shuffle buckets.
    os.makedirs(args.output_dir, exist_ok=True)
    buckets = ShuffleBuckets(os.path.join(args.output_dir, ".shuffle"), args.shuffle_buckets, random.Random(args.seed))
    ja_stats, en_stats = ReadStats(), ReadStats()
    japanese, ja_tokens, ja_chars = read_side(japanese_paths, "ja", tokenizer, args, ja_stats, buckets.add)
    if ja_tokens == 0:
        raise SystemExit(f"no Japanese text in {japanese_paths}")

    # 2. English until its tokens are `share` of the total: en = share / (1 - share) * ja.
    english_needed = args.english_token_share / (1 - args.english_token_share) * ja_tokens
    english, en_tokens, en_chars = 0, 0, 0
    if english_needed > 0:
        english, en_tokens, en_chars = read_side(english_paths, "en", tokenizer, args, en_stats, buckets.add,
                                                 english_needed)
    achieved = en_tokens / (ja_tokens + en_tokens)
    short = en_tokens < english_needed
    if short and not args.allow_lower_english_share:
        buckets.discard()
        raise SystemExit(
            f"the English files {english_paths} hold {en_tokens:,} tokens, fewer than the {english_needed:,.0f} needed "
            f"for an English share of {args.english_token_share} (reached {achieved:.4f}); add English files, lower "
            f"--english_token_share, or pass --allow_lower_english_share to accept {achieved:.4f}")

    # 3. Shuffle (bucket by bucket) and write.
    out_path = os.path.join(args.output_dir, "train.jsonl")
    buckets.write_shuffled(out_path)

    report = {
        "stage": "mix",
        "inputs": {"japanese_files": japanese_paths, "english_files": english_paths,
                   "tokenizer": args.tokenizer, "tokenizer_path": assets.resolve(args.tokenizer),
                   "vocab_size": len(tokenizer)},
        "output": {"train": out_path},
        "settings": {"english_token_share": args.english_token_share, "seed": args.seed,
                     "shuffle_buckets": args.shuffle_buckets,
                     "allow_lower_english_share": args.allow_lower_english_share},
        "tokens": {"ja": ja_tokens, "en": en_tokens, "total": ja_tokens + en_tokens},
        "documents": {"ja": japanese, "en": english, "total": japanese + english},
        "characters": {"ja": ja_chars, "en": en_chars},
        "characters_per_token": {"ja": round(ja_chars / ja_tokens, 3),
                                 "en": round(en_chars / en_tokens, 3) if en_tokens else None},
        "english_share": {"target": args.english_token_share, "achieved": round(achieved, 5),
                          "reached": not short, "english_tokens_needed": round(english_needed)},
        "skipped_bad_records": {"ja": dict(ja_stats.skipped), "en": dict(en_stats.skipped)},
        "timing_s": {"total": round(time.time() - started, 3)},
    }
    write_json_atomic(os.path.join(args.output_dir, "mix_report.json"), report)
    print(f"{japanese} ja + {english} en documents, {ja_tokens:,} + {en_tokens:,} tokens, "
          f"English share {achieved:.4f} (target {args.english_token_share}) -> {out_path}")


if __name__ == "__main__":
    try:
        main()
    except CorpusError as error:  # bad input: the message names the file and line; no traceback
        raise SystemExit(f"mix_corpus.py: error: {error}") from None
