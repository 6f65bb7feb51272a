#!/usr/bin/env python
"""How exactly two ways of loading the Mistral-7B-v0.1 tokenizer reproduce SentencePiece.

    python benchmarks/bench_mistral_tokenizer.py

1. what transformers 5 builds from `tokenizer.model` with the Hub's `LlamaTokenizer` config;
2. our `offline:mistral-7b-tokenizer` folder (toolkit/assets.py).
For each: documents whose token ids differ from `sentencepiece` and documents that do not
survive decode(encode(x)). Prints a markdown table (BENCHMARKS.md).
"""

import sys
from pathlib import Path
import json
import shutil
import tempfile
from dataclasses import dataclass, field

import sentencepiece
from transformers import AutoTokenizer, HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets
from toolkit.corpus import read_texts
from toolkit.quiet import quiet_by_default


@dataclass
class Arguments:
    files: list[str] = field(
        default_factory=lambda: ["sample_data/eval/ja_eval.jsonl.gz", "sample_data/eval/en_eval.jsonl.gz",
                                 "sample_data/target/ja_target.jsonl.gz"],
        metadata={"help": "JSONL(.gz) files whose documents are compared."},
    )


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    texts, _ = read_texts(args.files)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(assets.mistral_sentencepiece_model()))
    with tempfile.TemporaryDirectory() as hub_like:
        shutil.copy(assets.mistral_sentencepiece_model(), f"{hub_like}/tokenizer.model")
        with open(f"{hub_like}/tokenizer_config.json", "w") as stream:
            json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True}, stream)
        candidates = [
            ("LlamaTokenizer from tokenizer.model (the Hub's config)", AutoTokenizer.from_pretrained(hub_like)),
            ("offline:mistral-7b-tokenizer", AutoTokenizer.from_pretrained(assets.resolve("offline:mistral-7b-tokenizer"))),
        ]
        print("| tokenizer | documents | ids differ from sentencepiece | decode(encode(x)) != x |")
        print("|---|---:|---:|---:|")
        for name, tokenizer in candidates:
            encoded = [tokenizer(text).input_ids for text in texts]
            ids_differ = sum(ids != [reference.bos_id()] + reference.encode(text) for ids, text in zip(encoded, texts))
            lossy = sum(tokenizer.decode(ids, skip_special_tokens=True) != text for ids, text in zip(encoded, texts))
            print(f"| {name} | {len(texts)} | {ids_differ} | {lossy} |")


if __name__ == "__main__":
    main()
