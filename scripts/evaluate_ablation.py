#!/usr/bin/env python
"""Fine-tuned ablation: what do the extended vocabulary and the continued pretraining each add?

    python scripts/evaluate_ablation.py \
        --models mistralai/Mistral-7B-v0.1 out/pretrain-base out/pretrain \
        --model_names base continued extended \
        --effects data=continued:base tokenizer=extended:continued \
        --finetune --seeds 0 1 2 --sft_files sample_data/sft/sft_ja.jsonl \
        --contamination_files 'out/mix/text/*.jsonl.gz' --output_dir out/ablation

The three arms (README, "Ablation"): the raw base; the raw base continued-pretrained with
its own tokenizer on the same mix for the same number of characters; the extended base
continued-pretrained. Arm 2 - arm 1 is the effect of the data, arm 3 - arm 2 the effect of
the tokenizer. Any number of models works; `--effects NAME=A:B` names the differences
A - B to report (default: each model minus the one before it).

A raw base model "doesn't benchmark well": it continues text and never learned to stop.
So each model is first fine-tuned identically (`--finetune`: `scripts/finetune.py` under
`accelerate launch`, the same hyperparameters, data and data order for every base), once
per seed of `--seeds`; then every fine-tuned model is evaluated on the same things, with
budgets in characters, never tokens (a token budget gives a denser tokenizer more text):

1. bits per character on held-out Japanese and English text (`toolkit.metrics`), with a
   context window of `--bpc_window_characters` characters: tokenizer-independent;
2. the multiple-choice tasks in `--task_dir` (log-likelihood per character of each
   choice after the chat-rendered prompt) and the generation tasks (greedy answers of at
   most `--max_new_characters` characters, exact match, character-level F1 / ROUGE-L
   through `evaluate` modules in `metrics/`, and how often an answer stops with EOS);
3. lm-evaluation-harness tasks (`--lm_eval_tasks`): e.g. the JGLUE tasks of
   `sample_data/tasks/lm_eval/` (parquet, so they load with datasets 5; network);
4. decoding speed by forced decoding (`toolkit.speed`): every arm decodes the same held-out
   Japanese reference texts token by token with its KV cache, the same batch and device,
   in interleaved rounds; the figure is reference characters per second (= tokens/s x the
   tokenizer's characters/token on that text). What each arm writes by itself (free greedy
   generation) is described (characters/token written), never timed into an effect;
5. with `--contamination_files` (the pretraining mix), how many evaluated items of every task
   (held-out documents and lm-eval tasks included) share a 13-unit n-gram with it
   (`toolkit.decontamination`: 13 Japanese characters or 13 English words).

The verdict counts ONE primary metric per task (declared in the task file; bits per
character for held-out text; for lm-eval tasks the YAML's `metadata.primary_metric`, e.g.
balanced accuracy for MARC-ja and JNLI, char-F1 for JSQuAD, else its first); bits per byte, ROUGE-L,
exact match and the EOS rate are shown, not counted. Each effect gets a paired bootstrap
95% interval over seeds and examples (its size) and the p-value of a paired sign-flip
permutation test over items, seeds kept as blocks (`toolkit.statistics`); Holm's correction
runs across the tasks of each effect, separately for Japanese tasks and English retention,
and the table marks the differences that survive it. A row over fewer than
`--min_items_for_verdict` items reads "too few items to tell".

Outputs in --output_dir: `ablation_results.json`, `ablation_table.md`, `ablation_chart.png`,
`<name>/seed<k>/predictions.jsonl` (every answer), `finetuned/<name>/seed<k>/` (--finetune).

`ablation_results.json` schema (read by `publish.py` for the model card):

    {
      "models": [{"name": str, "model": str (as given), "runs": [{"seed": int|null,
                  "evaluated": str (the model evaluated: the fine-tune with --finetune),
                  "finetune_report": dict|null}]}, ...],
      "baseline": str,                      # the first model
      "effects": [{"name": str, "minuend": model name, "subtrahend": model name}],
      "seeds": [int] | [null],              # fine-tuning seeds (null: evaluated as given)
      "metrics": [{
          "task": str,                      # "heldout_ja", "heading_mc", "lm_eval:<task>", ...
          "metric": str,                    # "bits_per_character", "accuracy", "char_f1", ...
          "primary": bool,                  # counted in the verdict (one per task)
          "higher_is_better": bool,
          "examples": int,                  # documents or questions the figure is over
          "values": {model name: float},    # mean over seeds
          "values_per_seed": {model name: [float per seed]},
          "effects": {effect name: {
              "difference": float,          # value(minuend) - value(subtrahend)
              "ci95": [low, high],          # paired bootstrap over seeds and examples
              "p_value": float,             # two-sided paired sign-flip permutation test, seeds as blocks
              "p_holm": float|null,         # Holm-adjusted across the effect's primary rows of its family
              "survives_holm": bool|null,   # p_holm < alpha (primary rows with enough items only)
              "verdict": "better" | "worse" | "within noise" | "too few items to tell"}}}, ...],
              # primary rows: better/worse only if it survives Holm; others: the interval alone;
              # any row under --min_items_for_verdict items: "too few items to tell"
      "decoding_speed": {model name: {"characters_per_second", "tokens_per_second",  # forced decoding
                         "characters_per_token" (the tokenizer on the reference text), "seconds",
                         "characters", "tokens", "prompts", "reference_characters", "batch_size",
                         "repeats", "device", ...}},
      "speed_ratios": {effect name: {"characters_per_second", "tokens_per_second",
                       "characters_per_token"}},   # minuend / subtrahend; cps = tps x cpt
      "free_generation": {model name: {"characters", "tokens", "characters_per_token" (written,
                          U+FFFD excluded), "replacement_characters", "texts", ...}},  # descriptive
      "contamination": null | {"ngram": int, "files": [str], "documents_scanned": int,
                       "tasks": {task: {"items": int, "items_overlapping": int,   # every evaluated task: the
                                        "mix_documents_overlapping": int}}},     # evaluated items, held-out
                                        # documents (heldout_ja/en), lm-eval documents (lm_eval:<task>)
      "data_revisions": {"lm_eval:<task>": [{"source": str, "revision": str,   # as the task YAML names it
                         "commit": str|null}]},   # pinned, or the moving ref (refs/convert/parquet) as the
                                                  # Hub resolved it at evaluation; null offline
      "verdict": str,                       # the answer, effect by effect
      "settings": {...}, "bootstrap": {"samples", "seed", "confidence", "alpha", "correction"},
      "test": {"name", "permutations", "min_items_for_verdict", "families", "alpha"},
      "timings_seconds": {...}
    }
"""

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from toolkit import assets
from toolkit.chat import chat_template, require_eos
from toolkit.corpus import expand_paths, iter_records, read_texts
from toolkit.decontamination import DEFAULT_NGRAM, EvalNgramIndex, item_text, lm_eval_task_items
from toolkit.evaluation import (
    CORPUS_METRICS, bootstrap_difference, generate_answers, holm_adjust, lm_eval_tasks, load_metric,
    ratio_of_sums, read_tasks, score_multiple_choice,
)
from toolkit.metrics import bits_per_character
from toolkit.reports import read_json, write_json_atomic
from toolkit.speed import forced_decoding_speeds, free_generation, speed_ratio
from toolkit.statistics import DEFAULT_PERMUTATIONS, TOO_FEW, paired_permutation_p, paired_swap_p, task_family
from toolkit.quiet import launch_environment, quiet_by_default

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class AblationArguments:
    models: list[str] = field(metadata={"help": "Base models (Hub ids, folders, offline: names); the first is the baseline. "
                                        "Three arms: raw base, raw base + continued pretraining, extended base + "
                                        "continued pretraining."})
    output_dir: str = field(metadata={"help": "Where results, tables, charts and fine-tuned models go."})
    model_names: list[str] = field(default=None, metadata={"help": "A short name per model (default: model0, model1, ...)."})
    effects: list[str] = field(
        default=None, metadata={"help": "Differences to report, NAME=A:B meaning A - B (model names), e.g. "
                                "data=continued:base tokenizer=extended:continued. Default: each model minus the one "
                                "before it."})
    task_dir: str = field(default="sample_data/tasks", metadata={"help": "Folder of *.jsonl task files."})
    tasks: list[str] = field(default=None, metadata={"help": "Task file names (without .jsonl) to run; default all."})
    eval_files_ja: list[str] = field(default_factory=lambda: ["sample_data/eval/ja_eval.jsonl.gz"])
    eval_files_en: list[str] = field(default_factory=lambda: ["sample_data/eval/en_eval.jsonl.gz"])
    max_eval_documents: int = field(default=None, metadata={"help": "First N held-out documents per language."})
    max_eval_characters: int = field(default=None, metadata={"help": "Cut each held-out document to N characters."})
    bpc_window_characters: int = field(
        default=2048, metadata={"help": "Context window of bits per character, in characters of text (the same "
                                "context for every tokenizer)."})
    max_task_examples: int = field(default=None, metadata={"help": "First N questions per task."})
    max_new_characters: int = field(
        default=48, metadata={"help": "A generated answer stops at EOS or after this many characters, whatever the "
                              "tokenizer (a heading is at most 40 characters)."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts generated together (left-padded)."})
    speed_prompts: int = field(default=8, metadata={"help": "Held-out Japanese documents (of --eval_files_ja) whose "
                                                    "start is the prompt and the text after it the reference of the "
                                                    "decoding-speed measurement (0 to skip it)."})
    speed_prompt_characters: int = field(default=64, metadata={"help": "Characters of each speed prompt."})
    speed_reference_characters: int = field(
        default=64, metadata={"help": "Characters of reference text each arm decodes after each prompt (forced)."})
    speed_new_characters: int = field(default=64, metadata={"help": "Characters each prompt generates freely (what "
                                                            "each model writes, described only; 0 to skip it)."})
    speed_repeats: int = field(default=3, metadata={"help": "Timed rounds (every model once each; median per model), "
                                                    "after a warm-up. All models are in memory together for it."})
    contamination_files: list[str] = field(
        default=None, metadata={"help": "The pretraining mix's text (JSONL[.gz] with a 'text' field, globs): report "
                                "per task how many items share an n-gram with it."})
    contamination_ngram: int = field(default=DEFAULT_NGRAM, metadata={"help": "Characters per n-gram."})
    chat_template: str = field(default="auto", metadata={"help": "auto (the tokenizer's, else the default), default, or a .jinja file."})
    lm_eval_tasks: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "lm-evaluation-harness tasks, e.g. (network) ja_jglue_jcommonsenseqa ja_jglue_jnli "
                  "ja_jglue_marc_ja ja_jglue_jsquad from --lm_eval_include_path, and English retention "
                  "mmlu_computer_security hellaswag arc_easy; offline: ja_debian_heading_mc (the heading_mc "
                  "questions again, so not counted twice with it: use it to test the path). 'none' to skip."},
    )
    lm_eval_include_path: str = field(default="sample_data/tasks/lm_eval", metadata={"help": "Folder of local task YAMLs."})
    lm_eval_limit: int = field(default=None, metadata={"help": "Questions per lm-eval task (default all)."})
    lm_eval_num_fewshot: int = field(default=None, metadata={"help": "Few-shot examples (default: the task's own)."})
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap resamples of the 95% interval of "
                                                            "each effect (its size; the test is the permutation test)."})
    permutations: int = field(
        default=DEFAULT_PERMUTATIONS, metadata={"help": "Sign patterns of the paired permutation test (exact when "
                                                "2**items is at most this); the smallest p is 2/(permutations+1)."})
    min_items_for_verdict: int = field(
        default=20, metadata={"help": "Rows over fewer items read \"too few items to tell\": no better/worse, and "
                              "not in Holm's families."})
    seed: int = field(default=0, metadata={"help": "Bootstrap seed (fine-tuning seeds: --seeds)."})
    alpha: float = field(default=0.05, metadata={"help": "Family-wise error rate of Holm's correction, per effect "
                                                 "and family (Japanese tasks; English retention)."})


@dataclass
class FinetuneSettings:
    """Passed to scripts/finetune.py identically for every model."""

    finetune: bool = field(default=False, metadata={"help": "Fine-tune every model identically before evaluating."})
    seeds: list[int] = field(
        default_factory=lambda: [42],
        metadata={"help": "Fine-tune each model once per seed (same seeds for every model); intervals resample over "
                  "seeds and examples."})
    sft_files: list[str] = field(default_factory=lambda: ["sample_data/sft/sft_ja.jsonl"])
    accelerate_config: str = field(
        default=None, metadata={"help": "accelerate config for finetune.py (default: the 2-process CPU one without CUDA)."}
    )
    finetune_max_train_steps: int = field(default=None, metadata={"help": "Steps (default: one epoch)."})
    finetune_num_train_epochs: int = field(default=1)
    finetune_learning_rate: float = field(default=2e-5)
    finetune_per_device_train_batch_size: int = field(default=4)
    finetune_gradient_accumulation_steps: int = field(default=1)
    finetune_max_seq_length: int = field(
        default=1024, metadata={"help": "Tokens per chat; set it so that no chat is cut for any tokenizer (the "
                                "reports count cut chats, and the verdict warns when the arms saw different data)."})
    finetune_extra_args: str = field(default="", metadata={"help": "More finetune.py arguments, same for every model."})


def parse_effects(specs, names):
    """[(effect name, minuend, subtrahend)] from NAME=A:B specs, checked against the model names."""
    if not specs:
        return [(f"{later} − {earlier}", later, earlier) for earlier, later in zip(names, names[1:])]
    effects = []
    for spec in specs:
        name, _, pair = spec.partition("=")
        minuend, _, subtrahend = pair.partition(":")
        if not name or minuend not in names or subtrahend not in names or minuend == subtrahend:
            raise ValueError(f"--effects {spec!r}: expected NAME=A:B with two different model names among {names}")
        effects.append((name, minuend, subtrahend))
    if len({name for name, _, _ in effects}) != len(effects):
        raise ValueError(f"--effects: names must be distinct, got {[name for name, _, _ in effects]}")
    return effects


def finetune_command(model, output_dir, args, settings, seed):
    config = settings.accelerate_config or (
        None if torch.cuda.is_available() else str(REPO_ROOT / "accelerate_configs" / "cpu_zero3_2proc.yaml")
    )
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        command += ["--config_file", config]
    command += [
        str(REPO_ROOT / "scripts" / "finetune.py"), "--model_name_or_path", model, "--train_files", *settings.sft_files,
        "--output_dir", str(output_dir), "--chat_template", args.chat_template,
        "--learning_rate", str(settings.finetune_learning_rate),
        "--per_device_train_batch_size", str(settings.finetune_per_device_train_batch_size),
        "--gradient_accumulation_steps", str(settings.finetune_gradient_accumulation_steps),
        "--max_seq_length", str(settings.finetune_max_seq_length), "--seed", str(seed),
        "--num_train_epochs", str(settings.finetune_num_train_epochs), "--report_to", "none",
    ]
    if settings.finetune_max_train_steps:
        command += ["--max_train_steps", str(settings.finetune_max_train_steps)]
    return command + settings.finetune_extra_args.split()


def run_finetune(name, model, args, settings, seed):
    output = Path(args.output_dir) / "finetuned" / name / f"seed{seed}"
    command = finetune_command(model, output, args, settings, seed)
    print(f"\n--- fine-tuning {name} (seed {seed}): {' '.join(command)}", flush=True)
    # the launcher's and DeepSpeed's per-process banners stay out of the console unless --verbose
    subprocess.run(command, check=True, env=launch_environment({**os.environ, "PYTHONPATH": str(REPO_ROOT / "scripts")}))
    return str(output), read_json(output / "finetune_report.json")


def load_model(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    require_eos(tokenizer, path)
    if torch.cuda.is_available():  # one GPU, bf16: a 7B model fits a 40 GB card
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def heldout_texts(files, args):
    texts, _ = read_texts(files)
    texts = texts[: args.max_eval_documents] if args.max_eval_documents else texts
    return [text[: args.max_eval_characters] for text in texts] if args.max_eval_characters else texts


def reference_texts(args):
    """[(prompt, reference)] of the decoding-speed measurement: the first --speed_prompts held-out
    Japanese documents long enough for both (shorter ones are skipped and said)."""
    if not args.speed_prompts:
        return []
    texts, _ = read_texts(args.eval_files_ja)
    need = args.speed_prompt_characters + args.speed_reference_characters
    long_enough = [text for text in texts if len(text) >= need]
    pairs = [(text[: args.speed_prompt_characters], text[args.speed_prompt_characters: need])
             for text in long_enough[: args.speed_prompts]]
    if len(pairs) < args.speed_prompts:
        print(f"decoding speed: {len(pairs)} of the {args.speed_prompts} prompts asked for "
              f"({len(texts) - len(long_enough)} documents are shorter than {need} characters)", flush=True)
    if not pairs:
        raise ValueError(f"--eval_files_ja {args.eval_files_ja}: no document of {need} characters for the "
                         "decoding-speed measurement; lower --speed_prompt_characters/--speed_reference_characters")
    return pairs


LOWER_IS_BETTER = {"bits_per_character", "bits_per_byte"}
RATIO_METRICS = {"bits_per_character", "bits_per_byte"}


def evaluate_model(model, tokenizer, args, tasks, heldout, metric_modules, predictions_path, data_revisions=None):
    """Per-example results of one model: {(task, metric): list}, and {task: its primary metric}."""
    template = chat_template(tokenizer, args.chat_template)
    per_example, primary = {}, {}
    for language, texts in heldout.items():
        rows = []
        for text in tqdm(texts, desc=f"bits/char {language}", leave=False):
            figures = bits_per_character(model, tokenizer, [text], window_characters=args.bpc_window_characters)
            rows.append((figures.nll_nats, figures.characters, figures.utf8_bytes))
        per_example[(f"heldout_{language}", "bits_per_character")] = [(nll, chars) for nll, chars, _ in rows]
        per_example[(f"heldout_{language}", "bits_per_byte")] = [(nll, size) for nll, _, size in rows]
        primary[f"heldout_{language}"] = "bits_per_character"  # bits per byte: the same measurement, shown only
    predictions = []
    for task in tasks:
        primary[task.name] = task.primary_metric
        if task.kind == "multiple_choice":
            correct = []
            for example in tqdm(task.examples, desc=task.name, leave=False):
                chosen, scores = score_multiple_choice(model, tokenizer, template, example)
                correct.append(float(chosen == example["label"]))
                predictions.append({"task": task.name, "id": example.get("id"), "chosen": chosen,
                                    "label": example["label"], "scores_per_character": scores})
            per_example[(task.name, "accuracy")] = correct
        else:
            generated = generate_answers(model, tokenizer, template, [e["prompt"] for e in task.examples],
                                         args.max_new_characters, batch_size=args.generation_batch_size)
            answers = [text for text, _, _ in generated]
            stopped = [float(eos) for _, eos, _ in generated]
            for example, (text, eos, length) in zip(task.examples, generated):
                predictions.append({"task": task.name, "id": example.get("id"), "answer": text,
                                    "reference": example["reference"], "stopped_with_eos": eos, "new_tokens": length})
            references = [example["reference"] for example in task.examples]
            exact = metric_modules["exact_match"].compute(
                predictions=answers, references=references, regexes_to_ignore=[r"^\s+", r"\s+$"], return_scores=True
            )
            characters = metric_modules["char_f1"].compute(predictions=answers, references=references, return_scores=True)
            per_example[(task.name, "char_f1")] = characters["char_f1_scores"]
            per_example[(task.name, "char_rouge_l")] = characters["char_rouge_l_scores"]
            per_example[(task.name, "exact_match")] = exact["scores"]
            per_example[(task.name, "stops_with_eos")] = stopped
    if args.lm_eval_tasks and args.lm_eval_tasks != ["none"]:
        results = lm_eval_tasks(model, tokenizer, args.lm_eval_tasks, include_path=args.lm_eval_include_path,
                                limit=args.lm_eval_limit, num_fewshot=args.lm_eval_num_fewshot, samples=True)
        for task, samples in results["samples"].items():
            for metric, values in samples.items():
                per_example[(f"lm_eval:{task}", metric)] = values
            # the metric the task's YAML declares primary (metadata.primary_metric), else its first
            primary[f"lm_eval:{task}"] = results["primary"].get(task) or next(iter(samples))
        if data_revisions is not None:  # the commit each task's data was read at (moving refs resolved)
            data_revisions.update({f"lm_eval:{task}": found for task, found in results["data_revisions"].items()})
    with open(predictions_path, "w", encoding="utf-8") as stream:
        for row in predictions:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    return per_example, primary


def statistic_of(metric):
    """What a figure is over its per-example rows: a ratio of sums (bits per character), a
    figure over all (gold, predicted) rows (balanced accuracy, macro-F1), or a mean."""
    if metric in RATIO_METRICS:
        return ratio_of_sums
    return CORPUS_METRICS.get(metric, np.mean)


def aggregate(metric, values):
    return float(statistic_of(metric)(values))


def compare(names, effects, results, primary, args):
    """One row per (task, metric): values (mean over seeds), and each effect with its interval,
    p-value, and Holm's correction across the primary rows of that effect."""
    rows = []
    for key in results[names[0]][0]:
        task, metric = key
        statistic = statistic_of(metric)
        higher_is_better = metric not in LOWER_IS_BETTER
        per_seed = {name: [aggregate(metric, run[key]) for run in results[name]] for name in names}
        row = {"task": task, "metric": metric, "primary": primary.get(task) == metric,
               "higher_is_better": higher_is_better, "examples": len(results[names[0]][0][key]),
               "values": {name: float(np.mean(per_seed[name])) for name in names},
               "values_per_seed": per_seed, "effects": {}}
        for effect, minuend, subtrahend in effects:
            first, second = [run[key] for run in results[subtrahend]], [run[key] for run in results[minuend]]
            interval = bootstrap_difference(first, second, statistic=statistic, num_samples=args.bootstrap_samples,
                                            seed=args.seed)["ci95"]
            if metric in CORPUS_METRICS:  # a figure over all items: swap the two models' rows of an item
                p_value = paired_swap_p(first, second, statistic, permutations=args.permutations, seed=args.seed)
            else:
                p_value = paired_permutation_p(first, second, ratio=metric in RATIO_METRICS,
                                               permutations=args.permutations, seed=args.seed)
            difference = row["values"][minuend] - row["values"][subtrahend]
            verdict = (TOO_FEW if row["examples"] < args.min_items_for_verdict
                       else reading(*interval, difference, higher_is_better))
            row["effects"][effect] = {"difference": difference, "ci95": interval, "p_value": p_value, "p_holm": None,
                                      "survives_holm": None, "verdict": verdict}
        rows.append(row)
    holm_families(rows, effects, args.alpha, args.min_items_for_verdict)
    return rows


def holm_families(rows, effects, alpha, min_items):
    """Holm's correction per effect and family (Japanese tasks, English retention), over the
    primary rows with enough items for a verdict; the others keep p_holm None."""
    for effect, _, _ in effects:
        for family in ("japanese", "english"):
            counted = [row for row in rows if row["primary"] and row["examples"] >= min_items
                       and task_family(row["task"]) == family]
            for row, adjusted in zip(counted, holm_adjust([row["effects"][effect]["p_value"] for row in counted])):
                entry = row["effects"][effect]
                entry["p_holm"], entry["survives_holm"] = adjusted, adjusted < alpha
                if not entry["survives_holm"]:
                    entry["verdict"] = "within noise"


def reading(low, high, difference, higher_is_better):
    if low <= 0 <= high:
        return "within noise"
    return "better" if (difference > 0) == higher_is_better else "worse"


def verdict_paragraph(names, effects, rows, speed, alpha, min_items=20):
    if len(names) < 2:
        return f"Only one model ({names[0]}) was evaluated: nothing to compare."
    counted = [row for row in rows if row["primary"]]
    sentences = []
    for effect, minuend, subtrahend in effects:
        better = [row["task"] for row in counted if row["effects"][effect]["verdict"] == "better"]
        worse = [row["task"] for row in counted if row["effects"][effect]["verdict"] == "worse"]
        sentence = (f"{effect} ({minuend} − {subtrahend}): better on {len(better)} of {len(counted)} tasks"
                    + (f" ({', '.join(better)})" if better else "") + f", worse on {len(worse)}"
                    + (f" ({', '.join(worse)})" if worse else "")
                    + f" after Holm's correction at {alpha:g}; no detectable difference on the rest.")
        if minuend in speed and subtrahend in speed:
            ratio = speed_ratio(speed, minuend, subtrahend)
            sentence += (f" Decoding speed on the same reference text: {speed[minuend]['characters_per_second']:.1f} "
                         f"vs {speed[subtrahend]['characters_per_second']:.1f} characters/s "
                         f"({ratio['characters_per_second']:.2f}x = {ratio['tokens_per_second']:.2f}x tokens/s "
                         f"× {ratio['characters_per_token']:.2f}x characters/token).")
        sentences.append(sentence)
    sizes = sorted({r["examples"] for r in counted})
    sentences.append(f"One primary metric per task is counted; related figures are shown, not counted. Each task has "
                     f"{sizes[0]}-{sizes[-1]} items: read \"no detectable difference\" as \"these tasks, at this size, "
                     "cannot tell\".")
    too_few = sorted({row["task"] for row in counted if row["examples"] < min_items})
    if too_few:
        sentences.append(f"Too few items to tell (under {min_items}, no verdict): {', '.join(too_few)}.")
    return " ".join(sentences)


def markdown_table(names, effects, rows, speed, contamination, written=None):
    header = ["task", "metric", "n"] + names
    for effect, _, _ in effects:
        header += [f"{effect}", "95% CI", "p (Holm)", "reading"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(names) + 1)
             + "---:|---|---:|---|" * len(effects)]
    for row in sorted(rows, key=lambda r: not r["primary"]):
        metric = ("**" + row["metric"] + "**" if row["primary"] else row["metric"]) + (
            " ↑" if row["higher_is_better"] else " ↓")
        cells = [row["task"], metric, str(row["examples"])] + [f"{row['values'][n]:.3f}" for n in names]
        for effect, _, _ in effects:
            entry = row["effects"][effect]
            holm = ("not counted" if not row["primary"] else "–" if entry["p_holm"] is None
                    else f"{entry['p_holm']:.3f}" + (" ✓" if entry["survives_holm"] else ""))
            cells += [f"{entry['difference']:+.3f}", f"[{entry['ci95'][0]:+.3f}, {entry['ci95'][1]:+.3f}]", holm,
                      entry["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nBold: the task's primary metric, the only one counted; n: items; ✓: the difference " \
                             "survives Holm's correction across the tasks of that effect and family (Japanese tasks; " \
                             "English retention); –: too few items for a verdict. p: paired sign-flip permutation " \
                             "test over items, seeds as blocks; interval: paired bootstrap over seeds and items.\n"
    text += speed_tables(names, effects, speed, written)
    if contamination:
        text += (f"\n| contamination ({contamination['ngram']}-gram overlap with the pretraining mix, "
                 f"{contamination['documents_scanned']:,} documents) | items | overlapping |\n|---|---:|---:|\n")
        for task, entry in contamination["tasks"].items():
            text += f"| {task} | {entry['items']} | {entry['items_overlapping']} |\n"
    return text


def speed_tables(names, effects, speed, written):
    """Forced-decoding speed (with each effect's ratio and its two factors) and, apart, what each
    arm wrote by itself (descriptive: no speed or effect from it)."""
    text = ""
    if speed:
        text += ("\n| decoding speed (same reference text) | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names)
                 + "\n| reference characters/s | "
                 + " | ".join(f"{speed[n]['characters_per_second']:.1f}" for n in names) + " |\n"
                 + "| tokens/s | " + " | ".join(f"{speed[n]['tokens_per_second']:.1f}" for n in names) + " |\n"
                 + "| characters/token (reference text) | "
                 + " | ".join(f"{speed[n]['characters_per_token']:.2f}" for n in names) + " |\n")
        ratios = [(effect, speed_ratio(speed, a, b)) for effect, a, b in effects if a in speed and b in speed]
        if ratios:
            text += ("\n| effect | characters/s ratio | tokens/s ratio × characters/token ratio |\n|---|---:|---:|\n"
                     + "".join(f"| {effect} | {r['characters_per_second']:.2f}x | {r['tokens_per_second']:.2f}x × "
                               f"{r['characters_per_token']:.2f}x = "
                               f"{r['tokens_per_second'] * r['characters_per_token']:.2f}x |\n" for effect, r in ratios))
        first = speed[names[0]]
        text += (f"\nForced decoding: each of {first['prompts']} held-out Japanese prompts, then its next "
                 f"{first['reference_characters']} characters of reference text fed one token at a time (KV cache), "
                 f"batch {first['batch_size']}, on {first['device']}, median of {first['repeats']} interleaved rounds.\n")
    if written:
        text += ("\n| free generation (described, not timed) | " + " | ".join(names) + " |\n|---|"
                 + "---:|" * len(names) + "\n| characters written | "
                 + " | ".join(str(written[n]["characters"]) for n in names) + " |\n"
                 + "| tokens written | " + " | ".join(str(written[n]["tokens"]) for n in names) + " |\n"
                 + "| characters/token written | "
                 + " | ".join(f"{written[n]['characters_per_token']:.2f}" for n in names) + " |\n")
        first = written[names[0]]
        text += (f"\nGreedy, EOS suppressed, {first['new_characters']} characters after each of {first['prompts']} "
                 "prompts; U+FFFD (a character cut by the budget) not counted. What each model chose to write, so "
                 "no speed or effect is computed from it.\n")
    return text


def bar_chart(names, effects, rows, speed, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row["primary"]]
    panels = len(shown) + (1 if speed else 0)
    columns = 4
    lines = (panels + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.8 * lines), squeeze=False)
    colours = [f"C{i}" for i in range(len(names))]
    for axis, row in zip(axes.flat, shown):
        axis.bar(names, [row["values"][n] for n in names], color=colours)
        marks = " ".join(f"{effect}{'✓' if row['effects'][effect]['survives_holm'] else ''}" for effect, _, _ in effects)
        axis.set_title(f"{row['task']}\n{row['metric']} {'↑' if row['higher_is_better'] else '↓'}  {marks}", fontsize=7)
        axis.tick_params(labelsize=7)
        if row["higher_is_better"]:  # rates and accuracies
            axis.set_ylim(0, 1.05)
        for effect, minuend, subtrahend in effects:  # whisker on the minuend: the interval of its difference
            low, high = row["effects"][effect]["ci95"]
            index, value = names.index(minuend), row["values"][minuend]
            base = row["values"][subtrahend]
            axis.errorbar(index, value, yerr=[[max(value - (base + low), 0)], [max(base + high - value, 0)]],
                          color="k", capsize=3)
    if speed:
        axis = list(axes.flat)[len(shown)]
        axis.bar(names, [speed[n]["characters_per_second"] for n in names], color=colours)
        axis.set_title("decoding speed (forced)\nreference characters/s ↑", fontsize=7)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[panels:]:
        axis.axis("off")
    figure.suptitle("fine-tuned ablation: primary metrics (whiskers: 95% CI of each effect, on its first model; "
                    "✓: survives Holm)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def contamination_report(items, patterns, n):
    """Per evaluated task ({name: [item text]}): items sharing an n-gram with the mix, and mix
    documents sharing one with the task.

    Pass 1 streams the mix against an index of all task items (64 tasks per index: one pass
    per 64) and keeps the (few) documents that overlap; pass 2 indexes those documents and
    asks which items they overlap.
    """
    paths = expand_paths(patterns)
    if not paths:
        raise FileNotFoundError(f"--contamination_files {patterns}: no such files")
    names = list(items)
    flagged, per_task_documents = {}, {name: 0 for name in names}
    documents = 0
    for first in range(0, len(names), 64):
        index = EvalNgramIndex(n)
        for name in names[first:first + 64]:
            index.add(name, items[name])
        documents = 0
        batch = []

        def scan(batch, start):
            for offset, (text, overlapping) in enumerate(zip(batch, index.overlapping_tasks(batch))):
                for name in overlapping:
                    per_task_documents[name] += 1
                if overlapping:
                    flagged[start + offset] = text

        for path in tqdm(paths, desc="contamination", leave=False):
            for _, record in iter_records(path):
                batch.append(record["text"])
                documents += 1
                if len(batch) == 2000:
                    scan(batch, documents - len(batch))
                    batch = []
        if batch:
            scan(batch, documents - len(batch))
    mix_index = EvalNgramIndex(n)
    mix_index.add("mix", list(flagged.values()))
    report = {}
    for name in names:
        overlapping = sum(bool(found) for found in mix_index.overlapping_tasks(items[name])) if flagged else 0
        report[name] = {"items": len(items[name]), "items_overlapping": overlapping,
                        "mix_documents_overlapping": per_task_documents[name]}
    return {"ngram": n, "files": [str(p) for p in paths], "documents_scanned": documents, "tasks": report}


def evaluated_items(tasks, heldout, args):
    """{task: [item text]} of everything the ablation evaluates: the task files' items (the first
    --max_task_examples), the held-out documents, and each lm-eval task's documents (the first
    --lm_eval_limit) as `lm_eval:<task>`."""
    items = {task.name: [item_text(example) for example in task.examples] for task in tasks}
    items.update({f"heldout_{language}": list(texts) for language, texts in heldout.items()})
    if args.lm_eval_tasks and args.lm_eval_tasks != ["none"]:
        for name, texts in lm_eval_task_items(args.lm_eval_tasks, args.lm_eval_include_path, args.lm_eval_limit).items():
            items[f"lm_eval:{name}"] = texts
    return items


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    args, settings = HfArgumentParser((AblationArguments, FinetuneSettings)).parse_args_into_dataclasses()
    names = args.model_names or [f"model{i}" for i in range(len(args.models))]
    if len(names) != len(args.models) or len(set(names)) != len(names):
        raise ValueError(f"--model_names needs {len(args.models)} distinct names, got {names}")
    effects = parse_effects(args.effects, names)
    if len(set(settings.seeds)) != len(settings.seeds):
        raise ValueError(f"--seeds must be distinct, got {settings.seeds}")
    if not settings.finetune and len(settings.seeds) > 1:
        raise ValueError("--seeds with several seeds needs --finetune (the seeds are fine-tuning seeds)")
    seeds = settings.seeds if settings.finetune else [None]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    timings = {}

    # Fail on bad inputs before spending time on fine-tuning.
    for model in args.models:
        require_eos(AutoTokenizer.from_pretrained(assets.resolve(model)), model)
    tasks = read_tasks(args.task_dir, args.tasks, args.max_task_examples)
    heldout = {"ja": heldout_texts(args.eval_files_ja, args), "en": heldout_texts(args.eval_files_en, args)}
    speed_texts = reference_texts(args)
    metric_modules = {name: load_metric(name) for name in ("exact_match", "char_f1")}
    contamination = None
    if args.contamination_files:
        started = time.time()
        contamination = contamination_report(evaluated_items(tasks, heldout, args), args.contamination_files,
                                             args.contamination_ngram)
        timings["contamination"] = time.time() - started

    models = []
    for name, model in zip(names, args.models):
        runs = []
        for seed in seeds:
            evaluated, report = assets.resolve(model), None
            if settings.finetune:
                started = time.time()
                evaluated, report = run_finetune(name, evaluated, args, settings, seed)
                timings[f"finetune_{name}_seed{seed}"] = time.time() - started
            runs.append({"seed": seed, "evaluated": evaluated, "finetune_report": report})
        models.append({"name": name, "model": model, "runs": runs})

    results, primary, speed, data_revisions = {}, {}, {}, {}
    for entry in models:
        results[entry["name"]] = []
        for run in entry["runs"]:
            started = time.time()
            model, tokenizer = load_model(run["evaluated"])
            folder = output / entry["name"] / (f"seed{run['seed']}" if run["seed"] is not None else "as-given")
            folder.mkdir(parents=True, exist_ok=True)
            per_example, primary_of = evaluate_model(model, tokenizer, args, tasks, heldout, metric_modules,
                                                     folder / "predictions.jsonl", data_revisions)
            results[entry["name"]].append(per_example)
            primary.update(primary_of)
            timings[f"evaluate_{entry['name']}_seed{run['seed']}"] = time.time() - started
            del model
            gc.collect()
    written = {}
    if speed_texts:  # every arm's first fine-tune in memory at once, timed in interleaved rounds
        started = time.time()
        arms = {entry["name"]: load_model(entry["runs"][0]["evaluated"]) for entry in models}
        prompts, references = zip(*speed_texts)
        speed = forced_decoding_speeds(arms, list(prompts), list(references), batch_size=args.generation_batch_size,
                                       repeats=args.speed_repeats)
        timings["decoding_speed"] = time.time() - started
        if args.speed_new_characters:
            started = time.time()
            written = {name: free_generation(model, tokenizer, list(prompts), args.speed_new_characters,
                                             batch_size=args.generation_batch_size)
                       for name, (model, tokenizer) in arms.items()}
            timings["free_generation"] = time.time() - started
        del arms
        gc.collect()

    rows = compare(names, effects, results, primary, args)
    verdict = verdict_paragraph(names, effects, rows, speed, args.alpha, args.min_items_for_verdict)
    if settings.finetune:
        seen = {(run["seed"], run["finetune_report"]["examples"], run["finetune_report"]["steps"],
                 run["finetune_report"]["truncated"]) for m in models for run in m["runs"]}
        if len(seen) > len(seeds):  # e.g. --finetune_max_seq_length too short for one tokenizer's chats
            verdict += (" Caution: the fine-tunes did not see the same data (seed: examples, steps, chats cut): "
                        + "; ".join(f"{m['name']} seed {run['seed']}: {run['finetune_report']['examples']}, "
                                    f"{run['finetune_report']['steps']}, {run['finetune_report']['truncated']}"
                                    for m in models for run in m["runs"]) + ".")
    else:
        verdict += " The models were evaluated as given (no --finetune)."
    speed_ratios = {effect: speed_ratio(speed, a, b) for effect, a, b in effects if a in speed and b in speed}
    table = markdown_table(names, effects, rows, speed, contamination, written)
    (output / "ablation_table.md").write_text(table + "\n" + verdict + "\n", encoding="utf-8")
    bar_chart(names, effects, rows, speed, output / "ablation_chart.png")
    write_json_atomic(output / "ablation_results.json", {
        "models": models, "baseline": names[0],
        "effects": [{"name": e, "minuend": a, "subtrahend": b} for e, a, b in effects], "seeds": seeds,
        "metrics": rows, "decoding_speed": speed, "speed_ratios": speed_ratios, "free_generation": written,
        "contamination": contamination, "data_revisions": data_revisions,
        "verdict": verdict, "settings": {**asdict(args), **asdict(settings)},
        "tasks": [{"name": t.name, "kind": t.kind, "path": t.path, "examples": len(t.examples),
                   "primary_metric": t.primary_metric} for t in tasks],
        "bootstrap": {"samples": args.bootstrap_samples, "seed": args.seed, "confidence": 0.95,
                      "alpha": args.alpha, "correction": "holm", "resampled": "seeds and examples"},
        "test": {"name": "paired sign-flip permutation test over items, seeds kept as blocks (scipy.stats."
                         "permutation_test); exact when the sign patterns are at most the permutations",
                 "permutations": args.permutations, "min_items_for_verdict": args.min_items_for_verdict,
                 "families": ["japanese", "english"], "alpha": args.alpha, "correction": "holm"},
        "timings_seconds": timings,
    })
    print("\n" + table + "\n" + verdict)
    print(f"\nresults: {output / 'ablation_results.json'}  table: {output / 'ablation_table.md'}  "
          f"chart: {output / 'ablation_chart.png'}")


if __name__ == "__main__":
    main()
