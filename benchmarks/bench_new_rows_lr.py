#!/usr/bin/env python
"""Faster recovery of the new rows (issue 17): held-out JA/EN bits/char after a short continued
pretraining with and without a separate learning rate for the new embedding rows and the EEVE stage.

    python scripts/demo.py --output_dir outputs/demo-lr --stages select,tokenizer,mix
    python benchmarks/bench_new_rows_lr.py --data_dir outputs/demo-lr --output_dir outputs/bench_new_rows_lr \\
        --arms baseline eeve4 multiplier4 multiplier16

Each arm is `pretrain.py` with the demo's own arguments (scripts/demo.py: 2-process CPU ZeRO-3,
block 256, batch 2 per process, 2 held-out documents per language, the default `offset_fit` init and
learning rate) except a fixed number of optimizer steps (`--max_train_steps`, the same for every arm)
and the arm's own flags; the same seed, data and held-out documents; arms run one after another.
The baseline also evaluates at step 0 (the other arms start from the same model). Writes
`<output_dir>/<arm>/` (pretrain.py's outputs) and `<output_dir>/new_rows_lr.json` (a row per arm,
with the ratio to the baseline), and prints a Markdown table.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from toolkit.quiet import quiet_by_default  # noqa: E402
from toolkit.reports import write_json_atomic  # noqa: E402

# every arm names its multiplier: pretrain.py's default is 4 since this measurement chose it, so an arm
# without the flag would not be the baseline it was measured as
ARMS = {
    "baseline": ["--new_embeddings_lr_multiplier", "1"],
    "eeve4": ["--train_new_embeddings_only_steps", "4", "--new_embeddings_lr_multiplier", "1"],
    "multiplier2": ["--new_embeddings_lr_multiplier", "2"],
    "multiplier4": ["--new_embeddings_lr_multiplier", "4"],
    "multiplier8": ["--new_embeddings_lr_multiplier", "8"],
    "multiplier16": ["--new_embeddings_lr_multiplier", "16"],
    "multiplier64": ["--new_embeddings_lr_multiplier", "64"],
    "eeve4_multiplier4": ["--train_new_embeddings_only_steps", "4", "--new_embeddings_lr_multiplier", "4"],
    "eeve4_multiplier16": ["--train_new_embeddings_only_steps", "4", "--new_embeddings_lr_multiplier", "16"],
}


@dataclass
class BenchArguments:
    data_dir: str = field(metadata={"help": "Output dir of the demo's select,tokenizer,mix stages."})
    output_dir: str = field(metadata={"help": "Where each arm's run and new_rows_lr.json go."})
    arms: list[str] = field(default_factory=lambda: ["baseline", "eeve4", "multiplier4", "multiplier16"],
                            metadata={"help": f"Arms, in order: {', '.join(ARMS)}."})
    base_model: str = field(default="offline:smollm2-135m")
    max_train_steps: int = field(default=8)
    max_eval_documents: int = field(default=2, metadata={"help": "Held-out documents per language (the demo's 2)."})
    seed: int = field(default=42, metadata={"help": "pretrain.py's --seed (data order); other than 42, the arm's "
                                            "row and folder are named <arm>_seed<N>."})


def row_name(args, arm):
    return arm if args.seed == 42 else f"{arm}_seed{args.seed}"


def command(args, arm):
    data = Path(args.data_dir)
    return ["accelerate", "launch", "--config_file", "accelerate_configs/cpu_zero3_2proc.yaml",
            "scripts/pretrain.py", "--model_name_or_path", args.base_model,
            "--tokenizer_name", str(data / "tokenizer"), "--train_token_dir", str(data / "mix/tokens"),
            "--eval_files_ja", "sample_data/eval/ja_eval.jsonl.gz",
            "--eval_files_en", "sample_data/eval/en_eval.jsonl.gz",
            "--block_size", "256", "--per_device_train_batch_size", "2",
            "--max_train_steps", str(args.max_train_steps), "--max_eval_documents", str(args.max_eval_documents),
            "--eval_at_start", "true" if arm == "baseline" else "false", "--seed", str(args.seed),
            "--report_to", "none", "--output_dir", str(Path(args.output_dir) / row_name(args, arm)), *ARMS[arm]]


def main():
    quiet_by_default()
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    unknown = [arm for arm in args.arms if arm not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    output = Path(args.output_dir)
    results_path = output / "new_rows_lr.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else {}
    for arm in args.arms:
        line = command(args, arm)
        print("$ " + " ".join(line), flush=True)
        started = time.time()
        subprocess.run(line, cwd=REPO_ROOT, env=environment, check=True)
        report = json.loads((output / row_name(args, arm) / "training_report.json").read_text())
        rows[row_name(args, arm)] = {"flags": " ".join(ARMS[arm]), "wall_seconds": time.time() - started,
                     "steps": report["steps"], "tokens_seen": report["tokens_seen"],
                     "final_eval": report["final_eval"], "eval_at_start": report["eval_at_start"]}
        write_json_atomic(results_path, rows)
    baseline = rows.get(row_name(args, "baseline"), rows.get("baseline", {})).get("final_eval")
    print("| arm | flags | JA bits/char | JA / baseline | EN bits/char | EN / baseline | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    if rows.get("baseline", {}).get("eval_at_start"):
        start = rows["baseline"]["eval_at_start"]
        print(f"| step 0 | - | {start['eval_ja_bits_per_character']:.4f} | - | "
              f"{start['eval_en_bits_per_character']:.4f} | - | - |")
    for arm, row in rows.items():
        figures = row["final_eval"]
        ratio = {language: figures[f"eval_{language}_bits_per_character"]
                 / baseline[f"eval_{language}_bits_per_character"] if baseline else float("nan")
                 for language in ("ja", "en")}
        print(f"| {arm} | `{row['flags']}` | {figures['eval_ja_bits_per_character']:.4f} | {ratio['ja']:.4f} | "
              f"{figures['eval_en_bits_per_character']:.4f} | {ratio['en']:.4f} | {row['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
