#!/usr/bin/env python
"""Held-out bits per character of a base model and of its extended-vocabulary versions at step 0.

    python benchmarks/bench_pretrain.py --model_name_or_path offline:smollm2-135m \\
        --tokenizer_name outputs/demo/tokenizer --eval_files sample_data/eval/ja_eval.jsonl.gz \\
        --max_eval_documents 16 --max_length 256 --output_dir outputs/bench_pretrain

Rows: the base model with its own tokenizer, then the model extended for `--tokenizer_name`
under each data-free `--embedding_init` (toolkit.embeddings; the data-aware ones and their
cost: bench_embedding_init.py), before any training. Bits per character
(toolkit.metrics, sliding window of `--max_length`) compare models across tokenizers; the
first `--max_eval_documents` documents are used, as in pretrain.py's evaluation, so a
trained run's `final_eval` continues the same table. Writes bench_pretrain.json.
"""

import sys
from pathlib import Path
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets
from toolkit.corpus import read_texts
from toolkit.embeddings import DATA_INITS, INITS, extend_embeddings
from toolkit.metrics import bits_per_character
from toolkit.reports import write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class BenchArguments:
    model_name_or_path: str = field(metadata={"help": "Base model."})
    tokenizer_name: str = field(metadata={"help": "Extended tokenizer."})
    eval_files: list[str] = field(metadata={"help": "Held-out JSONL(.gz) files."})
    output_dir: str = field(metadata={"help": "Where bench_pretrain.json goes."})
    max_eval_documents: int = field(default=16)
    max_length: int = field(default=256, metadata={"help": "Sliding-window length (pretrain.py: --block_size)."})
    seed: int = field(default=42)


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    torch.set_grad_enabled(False)
    path = assets.resolve(args.model_name_or_path)
    texts, _ = read_texts(args.eval_files)
    texts = [t for t in texts if t.strip()][: args.max_eval_documents]
    base_tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve(args.tokenizer_name))
    rows = []

    def measure(name, model, model_tokenizer):
        started = time.time()
        result = bits_per_character(model.eval(), model_tokenizer, texts, max_length=args.max_length)
        rows.append({"model": name, **result.as_dict(), "seconds": time.time() - started})
        print(f"{name:<28} {result.bits_per_character:.4f} bits/char  {result.characters_per_token:.3f} chars/token",
              flush=True)

    measure("base (own tokenizer)", AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), base_tokenizer)
    for init in (i for i in INITS if i not in DATA_INITS):  # those need contexts: bench_embedding_init.py
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        extend_embeddings(model, tokenizer, base_tokenizer, init=init)
        measure(f"extended, step 0, {init}", model, tokenizer)
    write_json_atomic(f"{args.output_dir}/bench_pretrain.json", {
        "arguments": vars(args), "documents": len(texts), "characters": sum(map(len, texts)), "rows": rows})


if __name__ == "__main__":
    main()
