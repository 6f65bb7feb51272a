#!/usr/bin/env python
"""Fine-tuned ablation: does the extended base beat the raw base on Japanese?

    python scripts/evaluate_ablation.py --models mistralai/Mistral-7B-v0.1 out/pretrain \\
        --model_names base extended --finetune --sft_files sample_data/sft/sft_ja.jsonl \\
        --task_dir sample_data/tasks --output_dir out/ablation

A raw base model "doesn't benchmark well": it continues text and never learned to
stop. So each model is first fine-tuned identically (`--finetune`: `scripts/finetune.py`
under `accelerate launch`, the same hyperparameters, data and data order for every base),
then every fine-tuned model is evaluated on the same things:

1. bits per character and per UTF-8 byte on held-out Japanese and English text
   (`toolkit.metrics`): tokenizer-independent, fair across vocabularies;
2. the multiple-choice tasks in `--task_dir` (log-likelihood per character of each
   choice after the chat-rendered prompt) and the generation tasks (greedy answers,
   exact match and character-level F1 / ROUGE-L through `evaluate` modules in `metrics/`);
3. how often a generated answer stops with EOS within `--max_new_tokens`;
4. lm-evaluation-harness tasks (`--lm_eval_tasks`): by default the bundled local task
   (offline); with network e.g. the JGLUE tasks of its `japanese_leaderboard` group.

Every metric is compared with the first model (the baseline) per example, with a
paired bootstrap 95% interval (seeded). A difference whose interval contains 0 is
reported as within noise.

Outputs in --output_dir: `ablation_results.json`, `ablation_table.md`, `ablation_chart.png`,
`<name>/predictions.jsonl` (every answer, for inspection), `finetuned/<name>/` (with --finetune).

`ablation_results.json` schema (read by `publish.py` for the model card):

    {
      "models": [{"name": str, "model": str (as given), "evaluated": str (path of the model
                  evaluated: the fine-tuned one with --finetune), "finetune_report": dict|null}, ...],
      "baseline": str,                      # name of the first model; differences are vs it
      "metrics": [{
          "task": str,                      # "heldout_ja", "heading_mc", "lm_eval:<task>", ...
          "metric": str,                    # "bits_per_character", "accuracy", "char_f1", ...
          "higher_is_better": bool,
          "examples": int,                  # documents or questions the figure is over
          "values": {model name: float},
          "differences": {model name (not the baseline): {
              "difference": float,          # value(model) - value(baseline)
              "ci95": [low, high],          # paired bootstrap over examples
              "verdict": "better" | "worse" | "within noise"}}}, ...],
      "verdict": str,                       # the one-paragraph answer
      "settings": {...},                    # the arguments of the run
      "bootstrap": {"samples": int, "seed": int, "confidence": 0.95},
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
from toolkit.corpus import read_texts
from toolkit.evaluation import (
    generate_answers, lm_eval_tasks, load_metric, paired_bootstrap, ratio_of_sums, read_tasks, score_multiple_choice,
)
from toolkit.metrics import bits_per_character
from toolkit.reports import read_json, write_json_atomic
from toolkit.quiet import quiet_by_default

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class AblationArguments:
    models: list[str] = field(metadata={"help": "Base models (Hub ids, folders, offline: names); the first is the baseline."})
    output_dir: str = field(metadata={"help": "Where results, tables, charts and fine-tuned models go."})
    model_names: list[str] = field(default=None, metadata={"help": "A short name per model (default: model0, model1, ...)."})
    task_dir: str = field(default="sample_data/tasks", metadata={"help": "Folder of *.jsonl task files."})
    tasks: list[str] = field(default=None, metadata={"help": "Task file names (without .jsonl) to run; default all."})
    eval_files_ja: list[str] = field(default_factory=lambda: ["sample_data/eval/ja_eval.jsonl.gz"])
    eval_files_en: list[str] = field(default_factory=lambda: ["sample_data/eval/en_eval.jsonl.gz"])
    max_eval_documents: int = field(default=None, metadata={"help": "First N held-out documents per language."})
    max_eval_characters: int = field(default=None, metadata={"help": "Cut each held-out document to N characters."})
    max_task_examples: int = field(default=None, metadata={"help": "First N questions per task."})
    max_new_tokens: int = field(
        default=64, metadata={"help": "Token budget of a generated answer (a heading is at most 40 characters; a raw "
                              "base tokenizer needs over one token per Japanese character)."}
    )
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts generated together (left-padded)."})
    chat_template: str = field(default="auto", metadata={"help": "auto (the tokenizer's, else the default), default, or a .jinja file."})
    lm_eval_tasks: list[str] = field(
        default_factory=lambda: ["ja_debian_heading_mc"],
        metadata={"help": "lm-evaluation-harness tasks; with network e.g. ja_leaderboard_jcommonsenseqa "
                  "ja_leaderboard_jnli ja_leaderboard_marc_ja ja_leaderboard_jsquad. 'none' to skip."},
    )
    lm_eval_include_path: str = field(default="sample_data/tasks/lm_eval", metadata={"help": "Folder of local task YAMLs."})
    lm_eval_limit: int = field(default=None, metadata={"help": "Questions per lm-eval task (default all)."})
    lm_eval_num_fewshot: int = field(default=None, metadata={"help": "Few-shot examples (default: the task's own)."})
    bootstrap_samples: int = field(default=1000)
    seed: int = field(default=0, metadata={"help": "Bootstrap seed (fine-tuning has its own --seed)."})


@dataclass
class FinetuneSettings:
    """Passed to scripts/finetune.py identically for every model."""

    finetune: bool = field(default=False, metadata={"help": "Fine-tune every model identically before evaluating."})
    sft_files: list[str] = field(default_factory=lambda: ["sample_data/sft/sft_ja.jsonl"])
    accelerate_config: str = field(
        default=None, metadata={"help": "accelerate config for finetune.py (default: the 2-process CPU one without CUDA)."}
    )
    finetune_max_train_steps: int = field(default=None, metadata={"help": "Steps (default: one epoch)."})
    finetune_num_train_epochs: int = field(default=1)
    finetune_learning_rate: float = field(default=2e-5)
    finetune_per_device_train_batch_size: int = field(default=4)
    finetune_gradient_accumulation_steps: int = field(default=1)
    finetune_max_seq_length: int = field(default=512)
    finetune_seed: int = field(default=42, metadata={"help": "Same data order and initialisation for every model."})
    finetune_extra_args: str = field(default="", metadata={"help": "More finetune.py arguments, same for every model."})


def finetune_command(model, output_dir, args, settings):
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
        "--max_seq_length", str(settings.finetune_max_seq_length), "--seed", str(settings.finetune_seed),
        "--num_train_epochs", str(settings.finetune_num_train_epochs), "--report_to", "none",
    ]
    if settings.finetune_max_train_steps:
        command += ["--max_train_steps", str(settings.finetune_max_train_steps)]
    return command + settings.finetune_extra_args.split()


def run_finetune(name, model, args, settings):
    output = Path(args.output_dir) / "finetuned" / name
    command = finetune_command(model, output, args, settings)
    print(f"\n--- fine-tuning {name}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "scripts")})
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


def evaluate_model(model, tokenizer, args, tasks, heldout, metric_modules, predictions_path):
    """Per-example results of one model: {(task, metric): list}, plus aggregate-only figures."""
    template = chat_template(tokenizer, args.chat_template)
    per_example = {}
    for language, texts in heldout.items():
        rows = []
        for text in tqdm(texts, desc=f"bits/char {language}", leave=False):
            figures = bits_per_character(model, tokenizer, [text])
            rows.append((figures.nll_nats, figures.characters, figures.utf8_bytes))
        per_example[(f"heldout_{language}", "bits_per_character")] = [(nll, chars) for nll, chars, _ in rows]
        per_example[(f"heldout_{language}", "bits_per_byte")] = [(nll, size) for nll, _, size in rows]
    predictions = []
    for task in tasks:
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
                                         args.max_new_tokens, batch_size=args.generation_batch_size)
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
            per_example[(task.name, "exact_match")] = exact["scores"]
            per_example[(task.name, "char_f1")] = characters["char_f1_scores"]
            per_example[(task.name, "char_rouge_l")] = characters["char_rouge_l_scores"]
            per_example[(task.name, "stops_with_eos")] = stopped
    if args.lm_eval_tasks and args.lm_eval_tasks != ["none"]:
        results = lm_eval_tasks(model, tokenizer, args.lm_eval_tasks, include_path=args.lm_eval_include_path,
                                limit=args.lm_eval_limit, num_fewshot=args.lm_eval_num_fewshot, samples=True)
        for task, samples in results["samples"].items():
            for metric, values in samples.items():
                per_example[(f"lm_eval:{task}", metric)] = values
    with open(predictions_path, "w", encoding="utf-8") as stream:
        for row in predictions:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    return per_example


LOWER_IS_BETTER = {"bits_per_character", "bits_per_byte"}


def aggregate(metric, values):
    if metric == "bits_per_character" or metric == "bits_per_byte":
        return ratio_of_sums(values)
    return float(np.mean(values))


def compare(names, results, args):
    """One row per (task, metric): values, and differences to the baseline with intervals."""
    baseline = names[0]
    rows = []
    for key in results[baseline]:
        task, metric = key
        statistic = ratio_of_sums if metric in LOWER_IS_BETTER else np.mean
        higher_is_better = metric not in LOWER_IS_BETTER
        row = {"task": task, "metric": metric, "higher_is_better": higher_is_better,
               "examples": len(results[baseline][key]),
               "values": {name: aggregate(metric, results[name][key]) for name in names}, "differences": {}}
        for name in names[1:]:
            low, high = paired_bootstrap(results[baseline][key], results[name][key], statistic=statistic,
                                         num_samples=args.bootstrap_samples, seed=args.seed)
            difference = row["values"][name] - row["values"][baseline]
            if low <= 0 <= high:
                verdict = "within noise"
            else:
                verdict = "better" if (difference > 0) == higher_is_better else "worse"
            row["differences"][name] = {"difference": difference, "ci95": [low, high], "verdict": verdict}
        rows.append(row)
    return rows


def verdict_paragraph(names, rows):
    if len(names) < 2:
        return f"Only one model ({names[0]}) was evaluated: nothing to compare."
    sentences = []
    for name in names[1:]:
        better = [f"{r['task']} {r['metric']}" for r in rows if r["differences"][name]["verdict"] == "better"]
        worse = [f"{r['task']} {r['metric']}" for r in rows if r["differences"][name]["verdict"] == "worse"]
        noise = [r for r in rows if r["differences"][name]["verdict"] == "within noise"]
        sentence = f"Compared with {names[0]}, {name} is better on {len(better)} of {len(rows)} figures"
        sentence += f" ({', '.join(better)})" if better else ""
        sentence += f", worse on {len(worse)}" + (f" ({', '.join(worse)})" if worse else "")
        sentence += (f", and within noise on {len(noise)}: their paired bootstrap 95% intervals contain zero, so "
                     "these tasks, at this size, cannot tell the models apart.") if noise else "."
        sentences.append(sentence)
    sizes = sorted({r["examples"] for r in rows})
    sentences.append(f"Each figure is over {sizes[0]}-{sizes[-1]} examples; small home-made tasks over Debian "
                     "manuals, not public benchmarks, so treat differences inside the intervals as no difference.")
    return " ".join(sentences)


def markdown_table(names, rows):
    others = names[1:]
    header = ["task", "metric", "n"] + names + [f"{n} − {names[0]}" for n in others] + [f"95% CI ({n})" for n in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for row in rows:
        cells = [row["task"], row["metric"] + (" ↑" if row["higher_is_better"] else " ↓"), str(row["examples"])]
        cells += [f"{row['values'][n]:.3f}" for n in names]
        cells += [f"{row['differences'][n]['difference']:+.3f}" for n in others]
        cells += [f"[{row['differences'][n]['ci95'][0]:+.3f}, {row['differences'][n]['ci95'][1]:+.3f}] "
                  f"{row['differences'][n]['verdict']}" for n in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(names, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    lines = (len(rows) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.8 * lines), squeeze=False)
    for axis, row in zip(axes.flat, rows):
        values = [row["values"][n] for n in names]
        axis.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        axis.set_title(f"{row['task']}\n{row['metric']} {'↑' if row['higher_is_better'] else '↓'}", fontsize=8)
        axis.tick_params(labelsize=7)
        if row["higher_is_better"]:  # rates and accuracies
            axis.set_ylim(0, 1.05)
        for name in names[1:]:
            low, high = row["differences"][name]["ci95"]
            index = names.index(name)
            base = row["values"][names[0]]
            axis.errorbar(index, values[index], yerr=[[max(values[index] - (base + low), 0)],
                                                       [max(base + high - values[index], 0)]], color="k", capsize=3)
    for axis in list(axes.flat)[len(rows):]:
        axis.axis("off")
    figure.suptitle("fine-tuned ablation (bars: value; whiskers: 95% CI of the difference to the baseline)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    args, settings = HfArgumentParser((AblationArguments, FinetuneSettings)).parse_args_into_dataclasses()
    names = args.model_names or [f"model{i}" for i in range(len(args.models))]
    if len(names) != len(args.models) or len(set(names)) != len(names):
        raise ValueError(f"--model_names needs {len(args.models)} distinct names, got {names}")
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    timings = {}

    # Fail on bad inputs before spending time on fine-tuning.
    for model in args.models:
        require_eos(AutoTokenizer.from_pretrained(assets.resolve(model)), model)
    tasks = read_tasks(args.task_dir, args.tasks, args.max_task_examples)
    heldout = {"ja": heldout_texts(args.eval_files_ja, args), "en": heldout_texts(args.eval_files_en, args)}
    metric_modules = {name: load_metric(name) for name in ("exact_match", "char_f1")}

    models = []
    for name, model in zip(names, args.models):
        evaluated, report = assets.resolve(model), None
        if settings.finetune:
            started = time.time()
            evaluated, report = run_finetune(name, evaluated, args, settings)
            timings[f"finetune_{name}"] = time.time() - started
        models.append({"name": name, "model": model, "evaluated": evaluated, "finetune_report": report})

    results = {}
    for entry in models:
        started = time.time()
        model, tokenizer = load_model(entry["evaluated"])
        (output / entry["name"]).mkdir(exist_ok=True)
        results[entry["name"]] = evaluate_model(model, tokenizer, args, tasks, heldout, metric_modules,
                                                output / entry["name"] / "predictions.jsonl")
        del model
        gc.collect()
        timings[f"evaluate_{entry['name']}"] = time.time() - started

    rows = compare(names, results, args)
    verdict = verdict_paragraph(names, rows)
    if settings.finetune:
        seen = {(m["finetune_report"]["examples"], m["finetune_report"]["steps"]) for m in models}
        if len(seen) > 1:  # e.g. --max_seq_length too short for one tokenizer's prompts
            verdict += (" Caution: the fine-tunes did not see the same data (examples, steps per model: "
                        + ", ".join(f"{m['name']} {m['finetune_report']['examples']}, {m['finetune_report']['steps']}"
                                    for m in models) + ").")
    else:
        verdict += " The models were evaluated as given (no --finetune)."
    table = markdown_table(names, rows)
    (output / "ablation_table.md").write_text(table + "\n" + verdict + "\n", encoding="utf-8")
    bar_chart(names, rows, output / "ablation_chart.png")
    write_json_atomic(output / "ablation_results.json", {
        "models": models, "baseline": names[0], "metrics": rows, "verdict": verdict,
        "settings": {**asdict(args), **asdict(settings)},
        "tasks": [{"name": t.name, "kind": t.kind, "path": t.path, "examples": len(t.examples)} for t in tasks],
        "bootstrap": {"samples": args.bootstrap_samples, "seed": args.seed, "confidence": 0.95},
        "timings_seconds": timings,
    })
    print("\n" + table + "\n" + verdict)
    print(f"\nresults: {output / 'ablation_results.json'}  table: {output / 'ablation_table.md'}  "
          f"chart: {output / 'ablation_chart.png'}")


if __name__ == "__main__":
    main()
