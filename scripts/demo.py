#!/usr/bin/env python
"""The whole recipe, end to end, on the bundled sample corpus (CPU, offline): `make demo`.

Each stage is the command a user would type for their own run, printed before it runs,
with the demo's small sizes. A stage whose script is not in `scripts/` yet is listed as
not available instead of run. At the end: where each artifact is, and a summary table
read from the stages' JSON reports.

The ablation has three arms, as the full recipe (README, "Ablation"): the raw base; the
raw base continued-pretrained with its own tokenizer on the same mix; the extended base
continued-pretrained. Both pretraining runs stop after the same number of corpus
characters (`--max_train_characters`), so the raw base takes more, shorter-text steps.

Time budget on a quiet 2-core machine (the whole demo must stay under 15 minutes after the
install). Measured on one (BENCHMARKS.md, "Where the demo's time goes"), seconds: select 3,
tokenizer 9, mix 8, pretrain 156 (4 steps of 1,024 tokens; 72 of it the piece_fit init of the
new rows), pretrain_base 164 (9 steps: the raw tokenizer packs ~2.3x fewer characters per
token), ablation 302 (3 two-step fine-tunes 129, 3 evaluations on small subsets 111, forced
decoding 43, free generation 10), publish 6: 10 min 49 s in all.
"""

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from toolkit import assets
from toolkit.model_card import collect_facts, find_reports, load_reports, translate
from toolkit.reports import read_json, write_json_atomic
from toolkit.quiet import launch_environment, quiet_by_default

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "sample_data"
# Corpus characters each pretraining arm reads: ~4 steps of 1,024 tokens for the extended
# tokenizer on the demo mix (2.56 characters/token), ~9 for the raw base's (1.11).
DEMO_TRAIN_CHARACTERS = "10000"


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where every stage writes its outputs."})
    base_model: str = field(default="offline:smollm2-135m", metadata={"help": "The base model the demo extends."})
    stages: str = field(default="all", metadata={"help": "Comma-separated stage names to run, or 'all'."})


@dataclass
class Stage:
    name: str
    script: str  # the script that must exist for the stage to run
    command: list
    report: str  # the JSON report the stage writes, relative to the output dir


def stages(out, base_model):
    """The recipe's stages, in order, with the demo's sizes."""
    launch_cpu = ["accelerate", "launch", "--config_file", "accelerate_configs/cpu_zero3_2proc.yaml"]
    # 2 held-out documents per language: the final evaluation slides a 256-token window over them
    # (stride 128), which with 4 documents was 29% of the raw-tokenizer arm's stage (BENCHMARKS.md,
    # "Where the demo's time goes"); the ablation stage measures held-out text again, per arm.
    pretrain_sizes = ["--eval_files_ja", f"{SAMPLE}/eval/ja_eval.jsonl.gz",
                      "--eval_files_en", f"{SAMPLE}/eval/en_eval.jsonl.gz",
                      "--block_size", "256", "--per_device_train_batch_size", "2",
                      "--max_train_characters", DEMO_TRAIN_CHARACTERS, "--max_eval_documents", "2",
                      "--eval_at_start", "false"]
    return [
        Stage(
            "select", "select_data.py",
            ["python", "scripts/select_data.py",
             "--raw_datasets", f"{SAMPLE}/pool/data/ja/ja_clean_0000.jsonl.gz",
             "--target_datasets", f"{SAMPLE}/target/ja_target.jsonl.gz",
             "--num_to_sample", "600", "--output_dir", f"{out}/selection", "--workers", "2",
             # no raw document that shares a 13-character span with an ablation task item
             "--decontaminate_against", f"{SAMPLE}/tasks/*.jsonl"],
            "selection/selection_report.json",
        ),
        Stage(
            "tokenizer", "extend_tokenizer.py",
            ["python", "scripts/extend_tokenizer.py", "--base_tokenizer", base_model,
             "--train_files", f"{out}/selection/selected/*.jsonl.gz",
             "--eval_files", f"{SAMPLE}/eval/ja_eval.jsonl.gz", f"{SAMPLE}/eval/en_eval.jsonl.gz",
             "--vocab_size", "53248", "--output_dir", f"{out}/tokenizer"],
            "tokenizer/tokenizer_report.json",
        ),
        Stage(
            "mix", "mix_corpus.py",
            ["python", "scripts/mix_corpus.py", "--japanese_files", f"{out}/selection/selected/*.jsonl.gz",
             "--english_files", f"{SAMPLE}/pool/data/en/en_clean_0000.jsonl.gz",
             "--tokenizer", f"{out}/tokenizer", "--extra_tokenizers", f"base={base_model}",
             "--english_token_share", "0.1", "--output_dir", f"{out}/mix",
             # selection decontaminated the Japanese; the mix checks both languages (the English too)
             "--decontaminate_against", f"{SAMPLE}/tasks/*.jsonl"],
            "mix/mix_report.json",
        ),
        Stage(
            "pretrain", "pretrain.py",
            launch_cpu + ["scripts/pretrain.py", "--model_name_or_path", base_model,
                          "--tokenizer_name", f"{out}/tokenizer", "--train_token_dir", f"{out}/mix/tokens",
                          *pretrain_sizes, "--output_dir", f"{out}/pretrain"],
            "pretrain/training_report.json",
        ),
        Stage(
            # arm 2 of the ablation: the raw base, its own tokenizer, the same mix and characters
            "pretrain_base", "pretrain.py",
            launch_cpu + ["scripts/pretrain.py", "--model_name_or_path", base_model,
                          "--tokenizer_name", base_model, "--train_token_dir", f"{out}/mix/tokens-base",
                          *pretrain_sizes, "--output_dir", f"{out}/pretrain-base"],
            "pretrain-base/training_report.json",
        ),
        Stage(
            "ablation", "evaluate_ablation.py",
            ["python", "scripts/evaluate_ablation.py",
             "--models", base_model, f"{out}/pretrain-base", f"{out}/pretrain",
             "--model_names", "base", "continued", "extended",
             "--effects", "data=continued:base", "tokenizer=extended:continued",
             "--finetune", "--seeds", "0", "--sft_files", f"{SAMPLE}/sft/sft_ja.jsonl",
             "--task_dir", f"{SAMPLE}/tasks", "--output_dir", f"{out}/ablation",
             "--contamination_files", f"{out}/mix/text/*.jsonl.gz",
             # demo sizes: one seed, 2-step fine-tunes, small subsets of every evaluation;
             # 544 tokens hold the longest SFT chat for the raw tokenizer (523), so no arm sees a cut chat
             "--finetune_max_train_steps", "2", "--finetune_per_device_train_batch_size", "1",
             "--finetune_max_seq_length", "544", "--finetune_learning_rate", "5e-5",
             "--max_eval_documents", "3", "--max_eval_characters", "400", "--max_task_examples", "6",
             "--max_new_characters", "40",
             # speed: forced decoding of the same 32 reference characters after each of 4 prompts, a short
             # warm-up and 3 timed rounds; free generation (described only) writes 24 characters once per arm
             "--speed_prompts", "4", "--speed_reference_characters", "32", "--speed_new_characters", "24",
             "--speed_repeats", "3"],
            "ablation/ablation_results.json",
        ),
        Stage(
            "publish", "publish.py",
            ["python", "scripts/publish.py", "--model_dir", f"{out}/pretrain",
             "--repo_id", "your-org/smollm2-135m-ja-demo", "--reports", str(out), "--dry_run"],
            "pretrain/publish_report.json",
        ),
    ]


def key_figures(out):
    """The few numbers a person wants after the run, read from the stage reports.

    The model card's fact extraction (toolkit/model_card.py) is the one place that knows
    the reports' keys, so the summary and the card can never disagree.
    """
    facts = collect_facts(load_reports(find_reports([REPO_ROOT / out])))
    rows = []
    if facts["selection"]:
        f = facts["selection"]
        rows.append(("selected documents", f"{f['documents_selected']:,.0f} of {f['documents_read']:,.0f} read"))
    if facts["tokenizer"]:
        f = facts["tokenizer"]
        rows.append(("vocabulary", f"{f['base_vocab_size']:,.0f} -> {f['final_vocab_size']:,.0f}"))
        for row in f["chars_per_token"]:
            rows.append((f"{row['language']} characters/token", f"{row['base']:.2f} -> {row['extended']:.2f}"))
    if facts["mix"]:
        f = facts["mix"]
        rows.append(("training mix", f"{f['tokens_total']:,.0f} tokens, English share {f['english_share']:.3f}"))
    if facts["training"]:
        f = facts["training"]
        rows.append(("continued pretraining", f"{f['steps']:,.0f} steps, {f['tokens_seen']:,.0f} tokens"))
        for row in f["eval"]:
            if "bits_per_character" in row["name"]:
                rows.append((row["name"], f"{row['value']:.3f}"))
    if facts["ablation"]:
        f = facts["ablation"]
        labels = f.get("comparisons") or f["compared"]
        for task in f["tasks"]:
            scores = " vs ".join(f"{s:.3f}" if s is not None else "-" for s in task["scores"])
            outcome = ", ".join(f"{label.split(':')[0]} {translate(c['outcome'], 'en')}"
                                for label, c in zip(labels, task["comparisons"]))
            rows.append((f"{task['name']} ({task['metric']})", f"{' vs '.join(f['models'])}: {scores} [{outcome}]"))
        for row in f.get("finetune_first_loss") or []:
            per_character = row["first_loss_per_character"]
            rows.append((f"first fine-tuning loss {row['model']}",
                         f"{row['first_loss']:.2f} nats/answer token"
                         + (f", {per_character:.2f} nats/answer character (comparable across tokenizers)"
                            if per_character is not None else "")))
        for row in f.get("speed") or []:
            rows.append((f"decoding speed {row['model']}", f"{row['characters_per_second']:.1f} reference characters/s, "
                                                           f"{row['tokens_per_second']:.1f} tokens/s"))
            written = row.get("written_characters_per_token")
            rows.append((f"characters/token {row['model']}",
                         f"{row['characters_per_token']:.2f} on the reference text (the tokenizer's capacity)"
                         + (f", {written:.2f} in what it wrote (free generation)" if written is not None else "")))
        for row in f.get("speed_ratios") or []:
            product = row["tokens_per_second"] * row["characters_per_token"]
            rows.append((f"speed ratio ({row['effect']})",
                         f"{row['ratio']:.2f}x reference characters/s; tokens/s ratio x characters/token ratio = "
                         f"{row['tokens_per_second']:.2f} x {row['characters_per_token']:.2f} = {product:.2f} "
                         f"({abs(row['ratio'] / product - 1):.1%} apart)"))
    return rows


def chosen_stages(all_stages, names):
    """The stages named in `names` ("all" or comma-separated), in pipeline order."""
    if names == "all":
        return all_stages
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    unknown = wanted - {stage.name for stage in all_stages}
    if unknown:
        known = ", ".join(stage.name for stage in all_stages)
        raise SystemExit(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; choose from: {known}, or all")
    return [stage for stage in all_stages if stage.name in wanted]


def run(stage):
    print(f"\n=== {stage.name}: {shlex.join(stage.command)}", flush=True)
    command = list(stage.command)
    command[0] = {"python": sys.executable, "accelerate": str(Path(sys.executable).parent / "accelerate")}.get(
        command[0], command[0]
    )
    started = time.time()
    environment = launch_environment() if stage.command[0] == "accelerate" else dict(os.environ)
    subprocess.run(command, cwd=REPO_ROOT, check=True, env={**environment, "HF_HUB_OFFLINE": "1"})
    return time.time() - started


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses()
    out = Path(args.output_dir)
    if not out.is_absolute():
        out = Path(os.path.relpath(REPO_ROOT / out, REPO_ROOT))
    print(f"base model: {args.base_model} -> {assets.resolve(args.base_model)}")
    results = []
    for stage in chosen_stages(stages(out, args.base_model), args.stages):
        if not (REPO_ROOT / "scripts" / stage.script).exists():
            results.append((stage, "not available yet", None))
            continue
        seconds = run(stage)
        results.append((stage, f"{seconds:.0f} s", out / stage.report))
    print("\n=== Summary")
    print(f"{'stage':<10} {'time':>18}  report")
    for stage, status, report in results:
        print(f"{stage.name:<10} {status:>18}  {report or '-'}")
    summary = {
        stage.name: {"status": status, "report": str(report) if report else None,
                     "figures": read_json(REPO_ROOT / report) if report and (REPO_ROOT / report).exists() else None}
        for stage, status, report in results
    }
    figures = key_figures(out)
    if figures:
        print("\n=== Key figures (from the stage reports)")
        width = max(len(name) for name, _ in figures)
        for name, value in figures:
            print(f"{name:<{width}}  {value}")
    write_json_atomic(REPO_ROOT / out / "demo_report.json", summary)
    print(f"\nAll outputs are under {out}/ ; demo_report.json collects the stage reports.")


if __name__ == "__main__":
    main()
