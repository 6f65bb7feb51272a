#!/usr/bin/env python
"""Compare tokenizers by characters per token on the same texts: a table and a bar chart.

    python benchmarks/tokenizer_efficiency.py \
        --tokenizers offline:mistral-7b-tokenizer outputs/tokenizer Qwen/Qwen2.5-7B \
        --files sample_data/eval/ja_eval.jsonl.gz sample_data/eval/en_eval.jsonl.gz \
        --labels ja en --output_dir outputs/tokenizer_efficiency

More characters per token means shorter sequences for the same text: cheaper training and
inference and a longer effective context. Counts exclude special tokens (BOS/EOS), and text
that spells one ("<s>") counts as the characters it is. A Hub Llama/Mistral tokenizer
(class LlamaTokenizer, which transformers 5 rebuilds with a pipeline that differs from
SentencePiece) is loaded SentencePiece-exact from its tokenizer.model, as extend_tokenizer.py
loads a base (toolkit.tokenizer_extension.load_base_tokenizer).
Writes efficiency.md (markdown table), efficiency.png (bar chart) and
efficiency_report.json under --output_dir, and prints the table.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from transformers import HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit.corpus import expand_paths, iter_records
from toolkit.reports import write_json_atomic
from toolkit.tokenizer_extension import characters_per_token, load_base_tokenizer
from toolkit.quiet import quiet_by_default


@dataclass
class EfficiencyArguments:
    tokenizers: List[str] = field(metadata={"help": "Hub ids, local folders or offline:NAMEs of the tokenizers."})
    files: List[str] = field(metadata={"help": "JSONL(.gz) files (or globs) with a text field, e.g. one per language."})
    names: Optional[List[str]] = field(default=None, metadata={"help": "Display names, one per tokenizer."})
    labels: Optional[List[str]] = field(default=None, metadata={"help": "Column labels, one per file (e.g. ja en)."})
    output_dir: str = field(default="outputs/tokenizer_efficiency", metadata={"help": "Where the outputs go."})
    text_field: str = field(default="text", metadata={"help": "The JSON field holding the text."})


def file_label(path) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def markdown_table(rows, labels) -> str:
    lines = ["| tokenizer | vocabulary | " + " | ".join(f"{label} chars/token" for label in labels) + " |",
             "|---|---:|" + "---:|" * len(labels)]
    for row in rows:
        cells = " | ".join(f"{row['characters_per_token'][label]:.3f}" for label in labels)
        lines.append(f"| {row['name']} | {row['vocabulary']:,} | {cells} |")
    return "\n".join(lines) + "\n"


def bar_chart(rows, labels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(rows)
    figure, axes = plt.subplots(figsize=(max(6, 1.5 * len(labels) * len(rows)), 4))
    for index, row in enumerate(rows):
        positions = [position + index * width for position in range(len(labels))]
        values = [row["characters_per_token"][label] for label in labels]
        bars = axes.bar(positions, values, width, label=f"{row['name']} ({row['vocabulary']:,})")
        axes.bar_label(bars, fmt="%.2f", fontsize=8)
    axes.set_xticks([position + width * (len(rows) - 1) / 2 for position in range(len(labels))], labels)
    axes.set_ylabel("characters per token (higher is better)")
    axes.set_title("Tokenizer efficiency")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(EfficiencyArguments).parse_args_into_dataclasses()
    names = args.names or args.tokenizers
    paths = expand_paths(args.files)
    labels = args.labels or [file_label(path) for path in paths]
    if len(names) != len(args.tokenizers):
        raise ValueError(f"--names has {len(names)} entries for {len(args.tokenizers)} --tokenizers")
    if len(labels) != len(paths):
        raise ValueError(f"--labels has {len(labels)} entries for {len(paths)} files ({', '.join(paths)})")
    if len(set(labels)) != len(labels):
        raise ValueError(f"two files get the same label ({', '.join(labels)}); pass distinct --labels")
    texts = {label: [record[args.text_field] for _, record in iter_records(path, args.text_field)]
             for label, path in zip(labels, paths)}

    rows = []
    for name, name_or_path in zip(names, args.tokenizers):
        loaded = load_base_tokenizer(name_or_path)
        tokenizer = loaded.tokenizer
        figures = {label: characters_per_token(tokenizer, file_texts) for label, file_texts in texts.items()}
        rows.append({
            "name": name, "tokenizer": name_or_path, "pipeline_from": loaded.source, "vocabulary": len(tokenizer),
            "characters_per_token": {label: figure["characters_per_token"] for label, figure in figures.items()},
            "tokens": {label: figure["tokens"] for label, figure in figures.items()},
        })

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, labels)
    (output_dir / "efficiency.md").write_text(table, encoding="utf-8")
    bar_chart(rows, labels, output_dir / "efficiency.png")
    write_json_atomic(output_dir / "efficiency_report.json", {
        "files": dict(zip(labels, paths)),
        "characters": {label: sum(map(len, file_texts)) for label, file_texts in texts.items()},
        "tokenizers": rows,
    })
    print(table, end="")
    written = ", ".join(str(output_dir / name) for name in ("efficiency.md", "efficiency.png", "efficiency_report.json"))
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
