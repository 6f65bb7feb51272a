#!/usr/bin/env python
"""Select the raw documents that look most like a target sample, with DSIR importance resampling.

    python scripts/select_data.py \\
        --raw_datasets 'hf://datasets/allenai/MADLAD-400/data/ja/ja_clean_00*.jsonl.gz' \\
        --target_datasets my_target.jsonl --num_to_sample 1000000 --output_dir out/selection \\
        --executor local --workers 64

DSIR (the `data-selection` package's method) with features that work for Japanese (hashed
character n-grams), add-alpha smoothing, a length filter in characters and optional
decontamination against evaluation sets, run as datatrove stages (`toolkit.selection`) on
this machine or on a Slurm or Ray cluster (`toolkit.data_engine`). The selected set is the
same for any executor and number of tasks. Writes OUT/selected/NNNNN.jsonl.gz (the chosen
lines of raw file NNNNN, byte for byte, every field kept) and OUT/selection_report.json.
Counts, fit and scores are cached under OUT/cache/<key>/ with per-task completion markers:
the same command resumes after a crash, and another --seed or --num_to_sample reuses the scores.
"""

import os
import shutil
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from toolkit import data_engine, selection
from toolkit.corpus import CorpusError
from toolkit.decontamination import materialize_lm_eval_tasks
from toolkit.reports import read_json, write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class SelectionArguments:
    raw_datasets: list[str] = field(default_factory=list, metadata={
        "help": "Raw pool: .jsonl, .jsonl.gz, .jsonl.zst or .parquet files, globs, or "
                "hf://datasets/<org>/<name>/<file pattern> (streamed, not copied first)."})
    target_datasets: list[str] = field(default_factory=list, metadata={
        "help": "Target sample (the kind of text wanted), same forms as --raw_datasets."})
    num_to_sample: int = field(default=None, metadata={"help": "How many documents to select (K)."})
    output_dir: str = field(default=None, metadata={
        "help": "Where selected/ (gzip JSONL shards), selection_report.json and cache/ go."})
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
        "help": "n-grams of the raw pool to fit on, split evenly across the raw files: 'auto' (100k x num_buckets, "
                "as the package), 'all', or a number."})
    top_k: bool = field(default=False, metadata={"help": "Take the K highest weights instead of sampling."})
    seed: int = field(default=0, metadata={"help": "Seed of the resampling (same seed, same output)."})
    text_field: str = field(default="text", metadata={"help": "The JSON field holding the text."})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "Count and skip malformed lines (reported) instead of stopping at the first one."})
    decontaminate_against: list[str] = field(default_factory=list, metadata={
        "help": "Evaluation files (task JSONL: one item per record; any other file: one item) or lm-eval task/group "
                "names (lm_eval:NAME or NAME: the documents it evaluates). Every raw document sharing an n-gram "
                "(characters; an ASCII word is one unit) with an item is dropped before the fit, counted per task."})
    lm_eval_include_path: str = field(default="sample_data/tasks/lm_eval", metadata={
        "help": "Folder of local lm-eval task YAMLs for lm-eval names in --decontaminate_against."})
    decontamination_ngram: int = field(default=13, metadata={"help": "Units per n-gram of --decontaminate_against (a "
                                                             "character; an ASCII word is one unit)."})
    download: bool = field(default=False, metadata={
        "help": "Copy the matching hf:// files to the local HF cache first (snapshot_download) instead of streaming."})
    hub_revision: str = field(default=None, metadata={"help": "Revision (branch, tag, commit) of the hf:// datasets."})
    hub_cache_dir: str = field(default=None, metadata={"help": "With --download: where Hub files go (default: the HF cache)."})


def main(argv=None):
    quiet_by_default(argv)  # known third-party deprecation warnings hidden unless --verbose
    args, executor_args = HfArgumentParser((SelectionArguments, data_engine.ExecutorArguments)).parse_args_into_dataclasses(
        args=argv)
    # 1. Every argument checked before any heavy work.
    if args.num_to_sample is None or args.output_dir is None:
        raise SystemExit("--num_to_sample and --output_dir are required")
    if args.num_to_sample < 1:
        raise SystemExit(f"--num_to_sample must be at least 1, got {args.num_to_sample}")
    if not args.raw_datasets or not args.target_datasets:
        raise SystemExit("give --raw_datasets and --target_datasets")
    if args.decontamination_ngram < 1:
        raise SystemExit(f"--decontamination_ngram must be at least 1, got {args.decontamination_ngram}")
    num_ngrams_to_fit = {"auto": 100000 * (args.num_buckets or selection.DEFAULT_BUCKETS[args.featurizer]),
                         "all": None}.get(args.num_tokens_to_fit)
    if args.num_tokens_to_fit not in ("auto", "all"):
        if not args.num_tokens_to_fit.isdigit() or int(args.num_tokens_to_fit) < 1:
            raise SystemExit(f"--num_tokens_to_fit must be 'auto', 'all' or a positive number, got {args.num_tokens_to_fit!r}")
        num_ngrams_to_fit = int(args.num_tokens_to_fit)
    executor_args.validate()
    started = time.time()

    # 2. Inputs: local files, globs, hf:// streamed (or downloaded with --download).
    inputs = dict(download=args.download, revision=args.hub_revision, cache_dir=args.hub_cache_dir)
    raw_paths, raw_repeats = data_engine.dedupe_inputs(data_engine.resolve_inputs(args.raw_datasets, **inputs))
    target_paths, target_repeats = data_engine.dedupe_inputs(data_engine.resolve_inputs(args.target_datasets, **inputs))
    duplicates = {"raw_datasets": data_engine.warn_duplicates(raw_repeats, "raw files"),
                  "target_datasets": data_engine.warn_duplicates(target_repeats, "target files")}
    data_engine.check_output_dir(args.output_dir, raw_paths + target_paths)
    decontaminate_against = data_engine.resolve_inputs(
        materialize_lm_eval_tasks(args.decontaminate_against, os.path.join(args.output_dir, "decontamination"),
                                  args.lm_eval_include_path), **inputs, formats=None) if args.decontaminate_against else []
    if decontaminate_against:  # read now: a bad evaluation file is an error before any heavy work
        from toolkit.decontamination import EvalNgramIndex

        EvalNgramIndex.from_files(decontaminate_against, args.decontamination_ngram)
    executor_args = executor_args.resolved(len(raw_paths))

    # 3. The plan: the fit folder is keyed by everything that changes counts or scores (inputs,
    #    features, filters, bad-record policy, decontamination), never by the task split: the cached
    #    results are per file and part, the completion markers per task count; the draw folder adds
    #    seed, K and the task count (its per-task files).
    settings = {**selection.selection_settings(args.featurizer, args.ngrams, args.num_buckets, args.min_example_chars,
                                               args.min_example_length, args.smoothing_alpha, args.text_field,
                                               not args.no_latin_words),
                "num_tokens_to_fit": args.num_tokens_to_fit, "num_ngrams_to_fit": num_ngrams_to_fit,
                "skip_bad_records": args.skip_bad_records}
    fingerprints = {"raw_datasets": data_engine.file_fingerprint(raw_paths),
                    "target_datasets": data_engine.file_fingerprint(target_paths),
                    "decontaminate_against": data_engine.file_fingerprint(decontaminate_against)}
    fit_key = data_engine.stable_key({**fingerprints, **settings, "decontamination_ngram": args.decontamination_ngram})
    draw = {"num_to_sample": args.num_to_sample, "seed": args.seed, "top_k": args.top_k}
    draw_key = data_engine.stable_key({"fit": fit_key, **draw, "tasks": executor_args.tasks})
    fit_dir = os.path.join(args.output_dir, "cache", fit_key)
    plan = selection.SelectionPlan(
        raw_paths=raw_paths, target_paths=target_paths, units=data_engine.plan_units(raw_paths, executor_args.tasks),
        tasks=executor_args.tasks,
        featurizer=dict(featurizer=args.featurizer, ngrams=args.ngrams, num_buckets=args.num_buckets,
                        min_example_chars=args.min_example_chars, min_example_length=args.min_example_length,
                        latin_words=not args.no_latin_words),
        smoothing_alpha=args.smoothing_alpha, text_field=args.text_field, skip_bad_records=args.skip_bad_records,
        num_ngrams_to_fit=num_ngrams_to_fit, decontaminate_against=decontaminate_against,
        decontamination_ngram=args.decontamination_ngram, num_to_sample=args.num_to_sample, seed=args.seed,
        top_k=args.top_k, fit_dir=fit_dir, draw_dir=os.path.join(fit_dir, "draws", draw_key),
        output_dir=args.output_dir,
        raw_names=[data_engine.canonical_name(path) for path in raw_paths],
        report={"inputs": {**fingerprints, "duplicates_ignored": duplicates},
                "settings": {**settings, **draw, "decontamination_ngram": args.decontamination_ngram,
                             "executor": executor_args.executor, "tasks": executor_args.tasks,
                             "workers": executor_args.workers},
                "keys": {"fit": fit_key, "draw": draw_key}})
    claim_output(plan, draw_key)

    # 4. The stages: count -> fit -> score -> draw -> merge -> write -> report.
    stage_seconds = data_engine.run_stages(selection.selection_stages(plan), executor_args)
    report_path = os.path.join(args.output_dir, "selection_report.json")
    if stage_seconds is None:
        print(f"submitted to Slurm; the jobs' logs are under {fit_dir}/logs and {plan.draw_dir}/logs, "
              f"the report will be {report_path}")
        return
    report = read_json(report_path)
    report["timing_s"] = {"total_s": round(time.time() - started, 3), "stages_s": stage_seconds}
    write_json_atomic(report_path, report)
    counts = report["documents"]
    print(f"read {counts['read']}, filtered {counts['filtered_total']}, selected {counts['selected']}, "
          f"not selected {counts['not_selected']} -> {plan.selected_dir}")


def claim_output(plan, draw_key):
    """OUT/selected/ holds one draw. When this command's draw is not the one that last wrote there,
    its merge/write/report stages run again (cheap: the scores are cached) so that the folder
    cannot keep another draw's shards."""
    marker = os.path.join(plan.output_dir, ".draw")
    previous = open(marker).read().strip() if os.path.exists(marker) else None
    data_engine.remove_temporaries(plan.selected_dir)  # a killed writer's .tmp.* files
    if previous != draw_key:
        for stage in ("merge", "write", "report"):
            shutil.rmtree(os.path.join(plan.draw_dir, "logs", stage, "completions"), ignore_errors=True)
        report = os.path.join(plan.output_dir, "selection_report.json")
        if os.path.exists(report):
            os.remove(report)
        with data_engine.atomic_output(marker, "w") as stream:
            stream.write(draw_key + "\n")


if __name__ == "__main__":
    try:
        main()
    except CorpusError as error:  # bad input: the message names the file and line; no traceback
        raise SystemExit(f"select_data.py: error: {error}") from None
