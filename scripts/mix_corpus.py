#!/usr/bin/env python
"""Build the training corpus: the selected Japanese plus English at a target share of TOKENS.

    python scripts/mix_corpus.py --japanese_files 'out/selection/selected/*.jsonl.gz' \\
        --english_files 'hf://datasets/allenai/MADLAD-400/data/en/en_clean_000[0-3].jsonl.gz' \\
        --tokenizer out/tokenizer --english_token_share 0.1 --output_dir out/mix \\
        --extra_tokenizers base=mistralai/Mistral-7B-v0.1

Tokens are counted with the tokenizer the model will be trained with (the extended one),
so "10% English" means 10% of what the model sees. All Japanese documents are used;
English documents are taken in file order until their tokens reach the share. Runs as
datatrove stages (`toolkit.mixing`) on this machine or a Slurm or Ray cluster. Writes
OUT/text/NNNNN.jsonl.gz (the shuffled mix: each record keeps its fields, plus "lang"
unless it has one), OUT/mix_report.json, and the token shards the pretraining reads:
OUT/tokens/ for --tokenizer and OUT/tokens-LABEL/ for each --extra_tokenizers LABEL=NAME.
"""

import os
import shutil
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from toolkit import assets, data_engine, mixing, token_shards
from toolkit.corpus import CorpusError
from toolkit.decontamination import cached_index, materialize_lm_eval_tasks
from toolkit.reports import read_json, write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class MixArguments:
    japanese_files: list[str] = field(default_factory=list, metadata={
        "help": "Japanese .jsonl(.gz/.zst)/.parquet files, globs or hf://datasets/... (all used), e.g. the "
                "selection's 'OUT/selected/*.jsonl.gz'."})
    english_files: list[str] = field(default_factory=list, metadata={
        "help": "English files, same forms (taken in file and line order until the share is reached)."})
    tokenizer: str = field(default=None, metadata={"help": "The tokenizer the model will be trained with (folder, Hub id or offline: name)."})
    extra_tokenizers: list[str] = field(default_factory=list, metadata={
        "help": "LABEL=TOKENIZER: also write the mix's token shards with this tokenizer to OUT/tokens-LABEL/ "
                "(the ablation's raw-base arm: base=offline:smollm2-135m)."})
    output_dir: str = field(default=None, metadata={"help": "Where text/, tokens*/ and mix_report.json go."})
    english_token_share: float = field(default=0.1, metadata={"help": "English share of all tokens (0 <= share < 1)."})
    allow_lower_english_share: bool = field(default=False, metadata={
        "help": "If the English files run out before the share is reached, use them all and report the lower share "
                "instead of stopping with an error."})
    seed: int = field(default=0, metadata={"help": "Seed of the shuffle (same seed, same output)."})
    text_field: str = field(default="text", metadata={"help": "The JSON field holding the text."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Count and skip malformed lines (reported)."})
    overwrite_lang: bool = field(default=False, metadata={
        "help": "Set \"lang\" to ja/en on every record (default: a record's own \"lang\" is kept)."})
    decontaminate_against: list[str] = field(default_factory=list, metadata={
        "help": "Evaluation files (task JSONL: one item per record; any other file: one item) or lm-eval task/group "
                "names (lm_eval:NAME or NAME). Every document of EITHER language sharing an n-gram (characters; an ASCII "
                "word is one unit) with an item is dropped, counted per task in the report (selection only sees the Japanese)."})
    decontamination_ngram: int = field(default=13, metadata={"help": "Units per n-gram of --decontaminate_against (a "
                                                             "character; an ASCII word is one unit)."})
    lm_eval_include_path: str = field(default="sample_data/tasks/lm_eval", metadata={
        "help": "Folder of local lm-eval task YAMLs for lm-eval names in --decontaminate_against."})
    shuffle_bucket_mb: float = field(default=256, metadata={
        "help": "Megabytes of records per shuffle bucket (one text shard and one token shard each): the bucket "
                "count is the mix's size / this, at least 16. A shuffle task holds an index of 40 bytes per record "
                "of one bucket, not the records."})
    shuffle_buckets: int = field(default=None, metadata={
        "help": "Set the bucket count instead of deriving it from --shuffle_bucket_mb."})


def main(argv=None):
    quiet_by_default(argv)  # known third-party deprecation warnings hidden unless --verbose
    args, executor_args = HfArgumentParser((MixArguments, data_engine.ExecutorArguments)).parse_args_into_dataclasses(
        args=argv)
    # 1. Every argument checked before any heavy work.
    if not args.japanese_files or not args.tokenizer or not args.output_dir:
        raise SystemExit("--japanese_files, --tokenizer and --output_dir are required")
    if not 0 <= args.english_token_share < 1:
        raise SystemExit(f"--english_token_share must be in [0, 1), got {args.english_token_share}")
    if args.english_token_share > 0 and not args.english_files:
        raise SystemExit("--english_token_share > 0 needs --english_files")
    if args.shuffle_buckets is not None and args.shuffle_buckets < 1:
        raise SystemExit(f"--shuffle_buckets must be at least 1, got {args.shuffle_buckets}")
    if args.shuffle_bucket_mb <= 0:
        raise SystemExit(f"--shuffle_bucket_mb must be positive, got {args.shuffle_bucket_mb}")
    extra_tokenizers = parse_extra_tokenizers(args.extra_tokenizers)
    executor_args.validate()
    started = time.time()
    japanese_paths, japanese_repeats = data_engine.dedupe_inputs(data_engine.resolve_inputs(args.japanese_files))
    english_paths, english_repeats = data_engine.dedupe_inputs(
        data_engine.resolve_inputs(args.english_files) if args.english_files else [])
    duplicates = {"japanese_files": data_engine.warn_duplicates(japanese_repeats, "Japanese files"),
                  "english_files": data_engine.warn_duplicates(english_repeats, "English files")}
    japanese_identity = {data_engine.input_identity(path): path for path in japanese_paths}
    for path in english_paths:  # however each is spelled
        if data_engine.input_identity(path) in japanese_identity:
            raise SystemExit(f"{path} is both a Japanese (as {japanese_identity[data_engine.input_identity(path)]}) "
                             f"and an English input")
    data_engine.check_output_dir(args.output_dir, japanese_paths + english_paths)
    decontaminate_against, decontamination_tasks = decontamination_files(args)
    tokenizer_path, tokenizer = load_tokenizer_or_exit(args.tokenizer, "--tokenizer")  # not in a task
    executor_args = executor_args.resolved(len(japanese_paths) + len(english_paths))

    # 2. The plan: token counts are cached under a key of the inputs, tokenizer and task split;
    #    the scattered records are temporary under a key that adds seed, share and buckets.
    fingerprints = {"japanese_files": data_engine.file_fingerprint(japanese_paths),
                    "english_files": data_engine.file_fingerprint(english_paths)}
    if decontaminate_against:
        fingerprints["decontaminate_against"] = data_engine.file_fingerprint(decontaminate_against)
        fingerprints["decontamination_ngram"] = args.decontamination_ngram
    # The counts are cached per file and part (any --tasks reuses them); the mix key adds the settings
    # and the task count (the temporary scatter files are per task).
    count_key = data_engine.stable_key({**fingerprints, "tokenizer": token_shards.tokenizer_fingerprint(tokenizer_path),
                                        "text_field": args.text_field, "skip_bad_records": args.skip_bad_records})
    settings = {"english_token_share": args.english_token_share, "seed": args.seed,
                "shuffle_buckets": args.shuffle_buckets, "shuffle_bucket_mb": args.shuffle_bucket_mb,
                "allow_lower_english_share": args.allow_lower_english_share,
                "overwrite_lang": args.overwrite_lang, "skip_bad_records": args.skip_bad_records}
    mix_key = data_engine.stable_key({"count": count_key, **settings, "tasks": executor_args.tasks})
    cache_dir = os.path.join(args.output_dir, "cache", count_key)
    plan = mixing.MixPlan(
        japanese_paths=japanese_paths, english_paths=english_paths,
        units=mixing.plan_units(japanese_paths, english_paths, executor_args.tasks), tasks=executor_args.tasks,
        tokenizer_path=tokenizer_path, english_token_share=args.english_token_share,
        allow_lower_english_share=args.allow_lower_english_share, seed=args.seed,
        shuffle_buckets=args.shuffle_buckets, text_field=args.text_field, skip_bad_records=args.skip_bad_records,
        overwrite_lang=args.overwrite_lang, cache_dir=cache_dir,
        tmp_dir=os.path.join(args.output_dir, ".tmp", mix_key), output_dir=args.output_dir,
        names=[data_engine.canonical_name(path) for path in japanese_paths + english_paths],
        shuffle_bucket_mb=args.shuffle_bucket_mb,
        decontaminate_against=tuple(decontaminate_against), decontamination_ngram=args.decontamination_ngram,
        decontamination_tasks=tuple(decontamination_tasks),
        report={"inputs": {**fingerprints, "tokenizer": args.tokenizer, "tokenizer_path": tokenizer_path,
                           "vocab_size": len(tokenizer), "duplicates_ignored": duplicates},
                "settings": {**settings, "executor": executor_args.executor, "tasks": executor_args.tasks,
                             "workers": executor_args.workers},
                "keys": {"count": count_key, "mix": mix_key}})
    claim_output(plan, mix_key)

    # 3. count -> plan -> scatter -> shuffle -> report, then the token shards of each tokenizer.
    token_stages = token_shard_stages(plan, {"": tokenizer_path, **extra_tokenizers}, mix_key)
    stages = mixing.mix_stages(plan) + token_stages
    try:
        stage_seconds = data_engine.run_stages(stages, executor_args)
    finally:
        if executor_args.executor != "slurm":
            mixing.remove_temporary(plan)  # on success and on any error; a SIGKILL leaves them for the resume
    report_path = os.path.join(args.output_dir, "mix_report.json")
    if stage_seconds is None:
        print(f"submitted to Slurm; the report will be {report_path} (temporary files: {plan.tmp_dir})")
        return
    report = read_json(report_path)
    report["token_shards"] = {label or "training": os.path.join(args.output_dir, f"tokens-{label}" if label else "tokens")
                              for label in ["", *extra_tokenizers]}
    report["timing_s"] = {"total": round(time.time() - started, 3), "stages_s": stage_seconds}
    write_json_atomic(report_path, report)
    share = report["english_share"]
    print(f"{report['documents']['ja']} ja + {report['documents']['en']} en documents, {report['tokens']['ja']:,} + "
          f"{report['tokens']['en']:,} tokens, English share {share['achieved']:.4f} (target {share['target']}) "
          f"-> {plan.text_dir}")


def load_tokenizer_or_exit(name, flag):
    """(resolved path, tokenizer), or a one-line error naming the flag: before any work."""
    try:
        path = assets.resolve(name)
        return path, mixing.load_tokenizer(path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"{flag} {name}: cannot load a tokenizer ({first})") from None


def decontamination_files(args) -> tuple:
    """(evaluation files, their task names in index order) of --decontaminate_against (lm-eval task
    names written out as JSONL under OUT/decontamination/), read once now: a bad file is an error
    before any heavy work."""
    if not args.decontaminate_against:
        return [], []
    if args.decontamination_ngram < 1:
        raise SystemExit(f"--decontamination_ngram must be at least 1, got {args.decontamination_ngram}")
    entries = materialize_lm_eval_tasks(args.decontaminate_against, os.path.join(args.output_dir, "decontamination"),
                                        args.lm_eval_include_path)
    files = data_engine.resolve_inputs(entries, formats=None)
    return files, cached_index(tuple(files), args.decontamination_ngram).tasks


def parse_extra_tokenizers(entries) -> dict:
    tokenizers = {}
    for entry in entries:
        label, _, name = entry.partition("=")
        if not label or not name or not label.replace("-", "").replace("_", "").isalnum():
            raise SystemExit(f"--extra_tokenizers {entry!r}: expected LABEL=TOKENIZER, e.g. base=offline:smollm2-135m")
        if label in tokenizers:
            raise SystemExit(f"--extra_tokenizers: the label {label!r} is given twice")
        tokenizers[label], _ = load_tokenizer_or_exit(name, "--extra_tokenizers")
    return tokenizers


def token_shard_stages(plan, tokenizers, mix_key) -> list:
    """The mix's token shards: OUT/tokens/ (label "") and OUT/tokens-LABEL/, in datatrove's
    tokenized-file format with a token_shards.json manifest (`toolkit.token_shards`): text shard b
    becomes token shard b, whatever the task count. Their completion markers live in the folder
    they describe (FOLDER/.logs/), so both are claimed and removed together."""
    stages = []
    for label, tokenizer_path in tokenizers.items():
        name = f"tokens-{label}" if label else "tokens"
        folder = os.path.join(plan.output_dir, name)
        logs = os.path.join(folder, ".logs")
        (writer,) = token_shards.tokenize_steps(tokenizer_path, folder)
        stages.append(data_engine.Stage(name, [mixing.TokenizeMixShards(plan, writer)], plan.tasks,
                                        os.path.join(logs, "tokens")))
        stages.append(data_engine.Stage(f"{name}-manifest", [mixing.FinalizeMixTokens(plan, folder)], 1,
                                        os.path.join(logs, "manifest")))
    return stages


def claim_output(plan, mix_key):
    """OUT/text/ and OUT/tokens*/ (with the completion markers inside them) hold one mix. A different
    mix than the one that last wrote there starts from empty folders and a fresh report; temporary
    files a killed run left (.tmp.*) and temporary folders of other mixes are removed."""
    marker = os.path.join(plan.output_dir, ".mix")
    previous = open(marker).read().strip() if os.path.exists(marker) else None
    token_folders = [os.path.join(plan.output_dir, name) for name in
                     (os.listdir(plan.output_dir) if os.path.isdir(plan.output_dir) else [])
                     if name == "tokens" or name.startswith("tokens-")]
    if previous != mix_key:
        shutil.rmtree(plan.text_dir, ignore_errors=True)
        for folder in token_folders:  # token shards of another mix, and their completion markers
            shutil.rmtree(folder, ignore_errors=True)
        if os.path.exists(os.path.join(plan.output_dir, "mix_report.json")):
            os.remove(os.path.join(plan.output_dir, "mix_report.json"))
        with data_engine.atomic_output(marker, "w") as stream:
            stream.write(mix_key + "\n")
    for folder in [plan.text_dir, *token_folders]:
        data_engine.remove_temporaries(folder)
    temporary_root = os.path.dirname(plan.tmp_dir)
    if os.path.isdir(temporary_root):
        for name in os.listdir(temporary_root):
            if name != mix_key:
                shutil.rmtree(os.path.join(temporary_root, name), ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except CorpusError as error:  # bad input: the message names the file and line; no traceback
        raise SystemExit(f"mix_corpus.py: error: {error}") from None
