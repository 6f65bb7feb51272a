#!/usr/bin/env python
"""Benchmark the tokenizer extension: the numbers in BENCHMARKS.md, reproducibly.

    python benchmarks/bench_tokenizer.py --output_dir outputs/bench_tokenizer

For each base and total size: runs scripts/extend_tokenizer.py (the real CLI), trains a
plain Japanese-only BPE of the same total size on the same text (the upper reference for
Japanese: every slot spent on Japanese, no English), and measures characters/token on the
held-out eval files for base, extended and reference, plus encoding throughput of
extended over base on the same text in the same process (best of --repeats, alternating).
Writes bench_report.json and bench.md under --output_dir and prints the table.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from transformers import AutoTokenizer, HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets
from toolkit.corpus import read_texts
from toolkit.reports import read_json, write_json_atomic
from toolkit.tokenizer_extension import (
    characters_per_token,
    encoding_throughput,
    standalone_training_size,
    standalone_tokenizer,
    tokenizer_family,
    train_bpe,
)
from toolkit.quiet import quiet_by_default

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "sample_data"


@dataclass
class BenchArguments:
    output_dir: str = field(default="outputs/bench_tokenizer", metadata={"help": "Where outputs go."})
    runs: List[str] = field(
        default_factory=lambda: ["offline:mistral-7b-tokenizer=40192", "offline:mistral-7b-tokenizer=120000",
                                 "offline:smollm2-135m=53248"],
        metadata={"help": "BASE=TOTAL_VOCAB_SIZE pairs to extend and measure."},
    )
    train_files: List[str] = field(
        default_factory=lambda: [str(SAMPLE / "pool/data/ja/ja_clean_0000.jsonl.gz"),
                                 str(SAMPLE / "target/ja_target.jsonl.gz")],
        metadata={"help": "Japanese training text (not the eval split)."},
    )
    ja_eval: str = field(default=str(SAMPLE / "eval/ja_eval.jsonl.gz"), metadata={"help": "Held-out Japanese."})
    en_eval: str = field(default=str(SAMPLE / "eval/en_eval.jsonl.gz"), metadata={"help": "Held-out English."})
    repeats: int = field(default=5, metadata={"help": "Throughput: best of this many passes per tokenizer."})


def throughput_ratio(base, extended, texts, repeats):
    """Extended over base MB/s, alternating passes so both see the same machine load."""
    base_best, extended_best = 0.0, 0.0
    for _ in range(repeats):
        base_best = max(base_best, encoding_throughput(base, texts, repeats=1))
        extended_best = max(extended_best, encoding_throughput(extended, texts, repeats=1))
    return base_best, extended_best


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    train_texts, _ = read_texts(args.train_files)
    ja, _ = read_texts([args.ja_eval])
    en, _ = read_texts([args.en_eval])
    results = []
    for run in args.runs:
        base_name, total = run.rsplit("=", 1)
        out = output_dir / f"{base_name.replace('offline:', '').replace('/', '_')}-{total}"
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts/extend_tokenizer.py"), "--base_tokenizer", base_name,
                        "--train_files", *args.train_files, "--eval_files", args.ja_eval, args.en_eval,
                        "--vocab_size", total, "--output_dir", str(out)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        report = read_json(out / "tokenizer_report.json")
        base = AutoTokenizer.from_pretrained(assets.resolve(base_name))
        extended = AutoTokenizer.from_pretrained(str(out))
        base_json = json.loads(base.backend_tokenizer.to_str())
        family = tokenizer_family(base_json, base_name)
        size = report["final_vocab_size"]  # the reference gets the same total the extension reached
        trained = train_bpe(base_json, family, train_texts, standalone_training_size(base_json, family, size),
                            show_progress=False)
        reference = standalone_tokenizer(base_json, family, trained)
        base_speed, extended_speed = throughput_ratio(base, extended, ja + en, args.repeats)
        row = {"base": base_name, "requested": int(total), "vocabulary": size,
               "reference_vocabulary": reference.get_vocab_size(), "shortfall": report["shortfall"] is not None,
               "training_seconds": report["training_seconds"],
               "throughput_mb_per_s": {"base": base_speed, "extended": extended_speed,
                                       "extended_over_base": extended_speed / base_speed}}
        for label, texts in (("ja", ja), ("en", en)):
            row[label] = {name: characters_per_token(tokenizer, texts)["characters_per_token"]
                          for name, tokenizer in (("base", base), ("extended", extended), ("reference", reference))}
        results.append(row)
        print(json.dumps(row), flush=True)

    lines = ["| base | requested | reached | JA base | JA extended | JA ref. BPE | EN base | EN extended | EN ref. BPE "
             "| encode MB/s base | extended | ratio |", "|---|---:|---:|" + "---:|" * 9]
    for row in results:
        speed = row["throughput_mb_per_s"]
        lines.append(
            f"| {row['base']} | {row['requested']:,} | {row['vocabulary']:,} | {row['ja']['base']:.3f} | "
            f"{row['ja']['extended']:.3f} | {row['ja']['reference']:.3f} | {row['en']['base']:.3f} | "
            f"{row['en']['extended']:.3f} | {row['en']['reference']:.3f} | {speed['base']:.2f} | "
            f"{speed['extended']:.2f} | {speed['extended_over_base']:.2f} |")
    table = "\n".join(lines) + "\n"
    (output_dir / "bench.md").write_text(table, encoding="utf-8")
    write_json_atomic(output_dir / "bench_report.json", {"train_files": args.train_files,
                                                          "train_characters": sum(map(len, train_texts)),
                                                          "ja_eval": args.ja_eval, "en_eval": args.en_eval,
                                                          "runs": results})
    print(table, end="")


if __name__ == "__main__":
    main()
