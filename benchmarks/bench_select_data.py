#!/usr/bin/env python
"""Benchmarks of scripts/select_data.py (numbers in BENCHMARKS.md).

(a) Selection quality: pool = several Japanese sources + English, target = one Japanese
    source; precision = share of the K selected documents whose `source` is the target's.
    Compared: the data-selection package as is, our class with the package's featurizer,
    our Japanese featurizer, and random selection; same pool, same K, several seeds.
(b) Throughput of featurize + score, documents/second on one core, on the same Japanese
    documents, the package's featurizer against ours, in one run.
(c) End to end on one process: the package's fit + compute + resample against
    scripts/select_data.py on the local executor with one task (every stage, files included).

    python benchmarks/bench_select_data.py --output_dir outputs/bench_select
"""

import sys
from pathlib import Path
import gzip
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from data_selection import HashedNgramDSIR
from transformers import HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import select_data  # noqa: E402
from toolkit.corpus import iter_records, read_texts  # noqa: E402
from toolkit.reports import write_json_atomic  # noqa: E402
from toolkit.selection import Featurizer  # noqa: E402
from toolkit.quiet import quiet_by_default


@dataclass
class BenchArguments:
    output_dir: str = field(default="outputs/bench_select")
    pool: list[str] = field(default_factory=lambda: ["sample_data/pool/data/ja/ja_clean_0000.jsonl.gz",
                                                     "sample_data/pool/data/en/en_clean_0000.jsonl.gz"])
    target: list[str] = field(default_factory=lambda: ["sample_data/target/ja_target.jsonl.gz"])
    target_source: str = field(default="debian-reference-ja")
    num_to_sample: list[int] = field(default_factory=lambda: [150, 300])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    throughput_docs: str = field(default="sample_data/pool/data/ja/ja_clean_0000.jsonl.gz")
    repeats: int = field(default=3, metadata={"help": "Throughput: best of this many timed passes."})
    parts: list[str] = field(default_factory=lambda: ["throughput", "end_to_end", "quality"],
                             metadata={"help": "What to measure: throughput, end_to_end, quality."})


def sources_of(paths):
    return np.asarray([record["source"] for path in paths for _, record in iter_records(path)])


def plain_copies(paths, folder, prefix):
    """The package's loader reads plain .jsonl only: decompressed copies for the as-is baseline."""
    copies = []
    for index, path in enumerate(paths):
        copy = os.path.join(folder, f"{prefix}_{index}.jsonl")
        with gzip.open(path, "rb") as source, open(copy, "wb") as target:
            shutil.copyfileobj(source, target)
        copies.append(copy)
    return copies


def package_as_is(pool, target, work):
    """data-selection 1.0.3 unmodified: HashedNgramDSIR fit / compute once, resample per (K, seed)."""
    folder = tempfile.mkdtemp(dir=work)
    dsir = HashedNgramDSIR(plain_copies(pool, folder, "raw"), plain_copies(target, folder, "target"),
                           cache_dir=os.path.join(folder, "cache"), num_proc=1)
    dsir.fit_importance_estimator(num_tokens_to_fit="auto")
    dsir.compute_importance_weights()

    def choose(k, seed):
        np.random.seed(seed)
        out = tempfile.mkdtemp(dir=folder)
        os.rmdir(out)
        dsir.resample(out_dir=out, num_to_sample=k, cache_dir=out + "_cache")
        return sources_of([os.path.join(out, name) for name in sorted(os.listdir(out))])

    return choose, None


def ours(pool, target, work, sources, *options):
    """scripts/select_data.py (local executor, one task): the fit and scores are cached in one
    output folder, so each (K, seed) only redraws."""
    out = tempfile.mkdtemp(dir=work)
    state = {}

    def choose(k, seed):
        select_data.main(["--raw_datasets", *pool, "--target_datasets", *target, "--num_to_sample", str(k),
                          "--seed", str(seed), "--output_dir", out, "--tasks", "1", "--workers", "1", *options])
        with open(os.path.join(out, "selection_report.json"), encoding="utf-8") as stream:
            report = __import__("json").load(stream)
        state["candidates"] = report["documents"]["candidates"]
        return sources_of(report["output"]["selected_files"])

    return choose, state


METHODS = {
    "data-selection 1.0.3 as is (HashedNgramDSIR: words, 10000 buckets, 100-word filter, no smoothing)": None,
    "ours featurizer=dsir_default (package's words), 100-word filter, alpha=1": ["--featurizer", "dsir_default"],
    "ours featurizer=dsir_default (package's words), no word filter (>=100 chars), alpha=1":
        ["--featurizer", "dsir_default", "--min_example_length", "0"],
    "ours featurizer=japanese_char_ngrams --no_latin_words (every character a unit), alpha=1": ["--no_latin_words"],
    "ours featurizer=japanese_char_ngrams, 10000 buckets (the package's count), alpha=1": ["--num_buckets", "10000"],
    "ours featurizer=japanese_char_ngrams, defaults (1-3 grams, ASCII words, 65536 buckets, alpha=1)": [],
}


def quality(args, work):
    sources = sources_of(args.pool)
    rows = []
    for name, options in METHODS.items():
        if options is None:
            choose, state = package_as_is(args.pool, args.target, work)
        else:
            choose, state = ours(args.pool, args.target, work, sources, *options)
        for k in args.num_to_sample:
            precisions, languages = [], Counter()
            for seed in args.seeds:
                chosen_sources = choose(k, seed)
                precisions.append(float(np.mean(chosen_sources == args.target_source)))
                languages.update("ja" if s.endswith("-ja") else "en" for s in chosen_sources)
            rows.append({"method": name, "k": k, "precision_mean": round(float(np.mean(precisions)), 3),
                         "precision_per_seed": [round(p, 3) for p in precisions],
                         "candidates": (state or {}).get("candidates"),
                         "selected_english_share": round(languages["en"] / sum(languages.values()), 3)})
            print(rows[-1], flush=True)
    share = float(np.mean(sources == args.target_source))
    for k in args.num_to_sample:
        rows.append({"method": "random selection (expected precision = the source's share of the pool)", "k": k,
                     "precision_mean": round(share, 3), "candidates": len(sources)})
    return rows


def throughput(args, work):
    texts, _ = read_texts([args.throughput_docs])
    results = {"documents": len(texts), "characters": sum(map(len, texts)), "cores": 1}
    package = HashedNgramDSIR([args.throughput_docs], args.target, cache_dir=os.path.join(work, "tp_package"), num_proc=1)
    mine = Featurizer()
    # Scoring cost does not depend on the fitted values: random log ratios for both.
    package.log_diff = np.random.default_rng(0).normal(size=package.num_buckets)
    log_diff = np.random.default_rng(0).normal(size=mine.num_buckets)

    def timed(function):
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            function()
            best = min(best, time.perf_counter() - started)
        return round(len(texts) / best, 1)

    results["package_featurizer_per_doc"] = timed(
        lambda: [package.importance_estimator(package.featurizer(text)) for text in texts])
    results["ours_per_doc_api"] = timed(lambda: [float(log_diff @ mine.featurize(text)) for text in texts])
    results["ours_batched_512"] = timed(
        lambda: [mine.scores(mine.prepare(texts[i:i + 512])[0], log_diff) for i in range(0, len(texts), 512)])
    results["ratio_batched_vs_package"] = round(results["ours_batched_512"] / results["package_featurizer_per_doc"], 1)
    results["ratio_per_doc_vs_package"] = round(results["ours_per_doc_api"] / results["package_featurizer_per_doc"], 1)
    print(results, flush=True)
    return results


def end_to_end(args, work):
    """A whole selection (K=300) on one process, from the files (gzip, JSON parsing, length filter,
    caching and the output included): the package's fit + compute + resample against
    select_data.py on the local executor with one task and one worker, same documents."""
    folder = tempfile.mkdtemp(dir=work)
    results = {"documents": len(sources_of([args.throughput_docs])), "cores": 1, "num_to_sample": 300}
    package = HashedNgramDSIR(plain_copies([args.throughput_docs], folder, "raw"), plain_copies(args.target, folder, "target"),
                              cache_dir=os.path.join(folder, "package"), num_proc=1)
    started = time.perf_counter()
    package.fit_importance_estimator(num_tokens_to_fit="auto")
    package.compute_importance_weights()
    package.resample(out_dir=os.path.join(folder, "package_out"), num_to_sample=300, cache_dir=os.path.join(folder, "pc"))
    results["package"] = {"total_s": round(time.perf_counter() - started, 3)}
    started = time.perf_counter()
    select_data.main(["--raw_datasets", args.throughput_docs, "--target_datasets", *args.target, "--num_to_sample",
                      "300", "--output_dir", os.path.join(folder, "ours"), "--tasks", "1", "--workers", "1"])
    results["ours"] = {"total_s": round(time.perf_counter() - started, 3)}
    for name in ("package", "ours"):
        results[name]["docs_per_s"] = round(results["documents"] / results[name]["total_s"], 1)
    results["ratio"] = round(results["ours"]["docs_per_s"] / results["package"]["docs_per_s"], 1)
    print(results, flush=True)
    return results


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    os.makedirs(args.output_dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=args.output_dir)
    try:
        report = {"throughput_docs_per_s_per_core": throughput(args, work) if "throughput" in args.parts else None,
                  "end_to_end_one_core": end_to_end(args, work) if "end_to_end" in args.parts else None,
                  "quality": quality(args, work) if "quality" in args.parts else []}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json_atomic(os.path.join(args.output_dir, f"bench_select_report_{'_'.join(args.parts)}.json"), report)
    print("\n| method | K | precision (mean over seeds) | per seed | candidates | English share of selected |")
    print("|---|---:|---:|---|---:|---:|")
    for row in report["quality"]:
        print(f"| {row['method']} | {row['k']} | {row['precision_mean']:.3f} | {row.get('precision_per_seed', '-')} "
              f"| {row.get('candidates', '-')} | {row.get('selected_english_share', '-')} |")


if __name__ == "__main__":
    main()
