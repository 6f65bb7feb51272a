#!/usr/bin/env python
"""Select the raw documents that look most like a target sample, with DSIR importance resampling.

    python scripts/select_data.py \\
        --raw_datasets 'hf://datasets/allenai/MADLAD-400/data/ja/ja_clean_00*.jsonl.gz' \\
        --target_datasets my_target.jsonl --num_to_sample 1000000 --output_dir out/selection

Built on the `data-selection` package (`HashedNgramDSIR`: fit the importance estimator,
compute importance weights, resample), with features that work for Japanese (hashed
character n-grams), add-alpha smoothing, a length filter in characters, and all cores.
Writes OUT/selected.jsonl (the chosen lines, every field kept) and
OUT/selection_report.json; caches the weights under OUT/cache/ and reuses them on a rerun.
"""

import os
import time
from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser

from toolkit import selection
from toolkit.corpus import CorpusError
from toolkit.reports import write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class SelectionArguments:
    raw_datasets: list[str] = field(default_factory=list, metadata={
        "help": "Raw pool: .jsonl/.jsonl.gz files, globs, or hf://datasets/<org>/<name>/<file pattern>."})
    target_datasets: list[str] = field(default_factory=list, metadata={
        "help": "Target sample (the kind of text wanted), same forms as --raw_datasets."})
    num_to_sample: int = field(default=None, metadata={"help": "How many documents to select (K)."})
    output_dir: str = field(default=None, metadata={"help": "Where selected.jsonl, the report and the cache go."})
    featurizer: str = field(default="japanese_char_ngrams", metadata={
        "help": "japanese_char_ngrams (hashed character 1..n-grams) or dsir_default (the package's words).",
        "choices": list(selection.FEATURIZERS)})
    ngrams: int = field(default=3, metadata={"help": "Largest character n-gram (japanese_char_ngrams)."})
    num_buckets: int = field(default=None, metadata={
        "help": "Hash buckets (default: 65536 for japanese_char_ngrams, the package's 10000 for dsir_default)."})
    min_example_chars: int = field(default=100, metadata={
        "help": "Drop raw documents shorter than this many characters (after whitespace normalisation)."})
    min_example_length: int = field(default=100, metadata={
        "help": "dsir_default only: the package's filter in WordPunct words (100 as in the package)."})
    smoothing_alpha: float = field(default=1.0, metadata={
        "help": "Add-alpha smoothing: p = (count + alpha) / (total + alpha * num_buckets), for raw and target."})
    no_latin_words: bool = field(default=False, metadata={
        "help": "japanese_char_ngrams: make every character a unit, including ASCII letters and spaces "
                "(default: a run of ASCII letters/digits is one unit, a word)."})
    num_tokens_to_fit: str = field(default="auto", metadata={
        "help": "n-grams of the raw pool to fit on: 'auto' (100k x num_buckets, as the package), 'all', or a number."})
    top_k: bool = field(default=False, metadata={"help": "Take the K highest weights instead of sampling."})
    seed: int = field(default=0, metadata={"help": "Seed of the resampling (same seed, same output)."})
    num_proc: int = field(default=None, metadata={"help": "Processes (default: all cores available)."})
    batch_size: int = field(default=512, metadata={"help": "Documents per batch sent to a process."})
    text_field: str = field(default="text", metadata={"help": "The JSON field holding the text."})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "Count and skip malformed lines (reported) instead of stopping at the first one."})
    hub_dataset: str = field(default=None, metadata={"help": "A Hub dataset id to add to the raw pool, e.g. allenai/MADLAD-400."})
    hub_files: list[str] = field(default_factory=list, metadata={
        "help": "File patterns inside --hub_dataset, e.g. 'data/ja/ja_clean_000*.jsonl.gz'; only these are downloaded."})
    hub_revision: str = field(default=None, metadata={"help": "Revision (branch, tag, commit) of the Hub datasets."})
    hub_cache_dir: str = field(default=None, metadata={"help": "Where Hub files are downloaded (default: the HF cache)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide progress bars."})


def main(argv=None):
    quiet_by_default(argv)  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(SelectionArguments).parse_args_into_dataclasses(args=argv)
    if args.num_to_sample is None or args.output_dir is None:
        raise SystemExit("--num_to_sample and --output_dir are required")
    if not (args.raw_datasets or args.hub_dataset) or not args.target_datasets:
        raise SystemExit("give --raw_datasets (or --hub_dataset with --hub_files) and --target_datasets")
    started = time.time()
    num_proc = args.num_proc or len(os.sched_getaffinity(0))

    # 1. Inputs: local files and globs, and only the needed files of any Hub dataset.
    raw_paths = selection.resolve_inputs(args.raw_datasets, args.hub_dataset, args.hub_files,
                                         args.hub_revision, args.hub_cache_dir)
    target_paths = selection.resolve_inputs(args.target_datasets, revision=args.hub_revision,
                                            cache_dir=args.hub_cache_dir)
    num_tokens_to_fit = args.num_tokens_to_fit
    if num_tokens_to_fit not in ("auto", "all"):
        num_tokens_to_fit = int(num_tokens_to_fit)

    # 2. The DSIR object; its cache folder is keyed by the inputs and every setting (resume).
    features = dict(featurizer=args.featurizer, ngrams=args.ngrams, num_buckets=args.num_buckets,
                    min_example_chars=args.min_example_chars, min_example_length=args.min_example_length,
                    smoothing_alpha=args.smoothing_alpha, latin_words=not args.no_latin_words,
                    text_field=args.text_field)
    settings = {**selection.selection_settings(**features), "num_tokens_to_fit": num_tokens_to_fit}
    cache_dir = os.path.join(args.output_dir, "cache", selection.cache_key(raw_paths, target_paths, settings))
    dsir = selection.JapaneseDSIR(raw_paths, target_paths, cache_dir=cache_dir, num_proc=num_proc, seed=args.seed,
                                  skip_bad_records=args.skip_bad_records, batch_size=args.batch_size,
                                  show_progress=not args.no_progress, **features)

    # 3. The package's three steps.
    dsir.fit_importance_estimator(num_tokens_to_fit=num_tokens_to_fit)
    dsir.compute_importance_weights()
    selected = dsir.resample(out_dir=args.output_dir, num_to_sample=args.num_to_sample, top_k=args.top_k)

    # 4. The report: every document read is selected, filtered (with a reason) or not selected.
    report = build_report(args, dsir, raw_paths, target_paths, selected, settings, num_proc, time.time() - started)
    report["output"]["plot"] = plot_weights(dsir, selected["mask"], os.path.join(args.output_dir, "log_importance_weights.png"))
    write_json_atomic(os.path.join(args.output_dir, "selection_report.json"), report)
    counts = report["documents"]
    print(f"read {counts['read']}, filtered {counts['filtered_total']}, selected {counts['selected']}, "
          f"not selected {counts['not_selected']} -> {selected['path']}")


def plot_weights(dsir, mask, path):
    """Histogram of the log importance weights: all candidates against the selected ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_weights, status, _ = dsir.load_weights()
    candidates = log_weights[status == selection.CANDIDATE]
    figure, axis = plt.subplots(figsize=(7, 4))
    bins = np.linspace(candidates.min(), candidates.max(), 60)
    axis.hist(candidates, bins=bins, alpha=0.6, label=f"candidates ({len(candidates):,})")
    axis.hist(log_weights[mask], bins=bins, alpha=0.8, label=f"selected ({int(mask.sum()):,})")
    axis.set_xlabel("log importance weight (sum of log p_target/p_raw over the document's n-grams)")
    axis.set_ylabel("documents")
    axis.set_title(f"DSIR weights, featurizer {dsir.featurizer_name}")
    axis.legend()
    figure.tight_layout()
    temporary = os.path.join(os.path.dirname(path), ".tmp." + os.path.basename(path))
    figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    os.replace(temporary, path)
    return path


def build_report(args, dsir, raw_paths, target_paths, selected, settings, num_proc, seconds):
    log_weights, status, chars = dsir.load_weights()
    mask = selected["mask"]
    candidate = status == selection.CANDIDATE
    reasons = {reason: int((status == code).sum()) for code, reason in selection.CODE_REASON.items()}
    filtered = {reason: count for reason, count in reasons.items() if count}
    documents = {
        "read": int(len(status)),
        "filtered": filtered,
        "filtered_total": int(sum(filtered.values())),
        "candidates": int(candidate.sum()),
        "selected": int(mask.sum()),
        "not_selected": int((candidate & ~mask).sum()),
    }
    if documents["read"] != documents["selected"] + documents["filtered_total"] + documents["not_selected"]:
        raise AssertionError(f"document accounting does not add up: {documents}")
    per_file, start = [], 0
    for index, path in enumerate(raw_paths):
        count = int(np.load(dsir._metadata_path(index)).shape[1])
        per_file.append({"path": path, "read": count, "selected": int(mask[start:start + count].sum())})
        start += count
    quantiles = lambda values: {f"p{q}": round(float(np.percentile(values, q)), 3) for q in (5, 50, 95)}  # noqa: E731
    return {
        "stage": "select",
        "inputs": {"raw_datasets": selection.file_fingerprint(raw_paths),
                   "target_datasets": selection.file_fingerprint(target_paths),
                   "hub_dataset": args.hub_dataset, "hub_files": args.hub_files, "hub_revision": args.hub_revision},
        "output": {"selected": selected["path"], "cache_dir": str(dsir.cache_dir)},
        "settings": {**settings, "num_to_sample": args.num_to_sample, "seed": args.seed, "top_k": args.top_k,
                     "num_proc": num_proc, "skip_bad_records": args.skip_bad_records},
        "documents": documents,
        "documents_per_file": per_file,
        "characters": {"unit": "characters after NFKC + whitespace normalisation",
                       "read": int(chars.sum()), "candidates": int(chars[candidate].sum()),
                       "selected": int(chars[mask].sum())},
        "target": dsir.target_stats,
        "log_importance_weights": {"candidates": quantiles(log_weights[candidate]),
                                   "selected": quantiles(log_weights[mask])},
        "resumed": dsir.resumed,
        "timing_s": {**dsir.timings, "total_s": round(seconds, 3)},
        "throughput": {"documents_scored_per_s": round(documents["read"] / dsir.timings["score_s"], 1)
                       if dsir.timings.get("score_s") and not dsir.resumed.get("weights_files_reused") else None},
    }


if __name__ == "__main__":
    try:
        main()
    except CorpusError as error:  # bad input: the message names the file and line; no traceback
        raise SystemExit(f"select_data.py: error: {error}") from None
