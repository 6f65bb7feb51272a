#!/usr/bin/env python
"""How exactly the ways of loading a Mistral-7B-v0.1 tokenizer reproduce SentencePiece.

    python benchmarks/bench_mistral_tokenizer.py [--extended_tokenizer OUT/tokenizer]

1. what transformers 5 builds from `tokenizer.model` with the Hub's `LlamaTokenizer` config;
2. our `offline:mistral-7b-tokenizer` folder (toolkit/assets.py).
For each: documents whose token ids differ from `sentencepiece` and documents that do not
survive decode(encode(x)).

With --extended_tokenizer (a Mistral extended by scripts/extend_tokenizer.py): its
tokenizer.json against its tokenizer.model read by `sentencepiece`, and against llama.cpp
itself tokenising a GGUF built as llama.cpp's converter builds it (gguf package). Text is
tokenised as data is: "<s>" in a document is text. Prints markdown tables (BENCHMARKS.md).
"""

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
from transformers import AutoTokenizer, HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets
from toolkit.corpus import read_texts
from toolkit.quiet import quiet_by_default
from toolkit.tokenizer_extension import ADVERSARIAL_TEXTS, write_gguf_vocabulary


@dataclass
class Arguments:
    files: list[str] = field(
        default_factory=lambda: ["sample_data/eval/ja_eval.jsonl.gz", "sample_data/eval/en_eval.jsonl.gz",
                                 "sample_data/target/ja_target.jsonl.gz"],
        metadata={"help": "JSONL(.gz) files whose documents are compared."},
    )
    extended_tokenizer: str = field(
        default=None, metadata={"help": "An extended Mistral tokenizer folder (with tokenizer.model) to check too."}
    )


def loading_paths(texts):
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


def extended_agreement(folder: Path, texts):
    import llama_cpp

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = [tokenizer(text, split_special_tokens=True).input_ids for text in texts]
    reference = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        gguf_file = write_gguf_vocabulary(folder, Path(scratch) / "vocab.gguf")
        convert_seconds = time.perf_counter() - started
        llama = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
        rows = [
            ("tokenizer.model read by sentencepiece", [[reference.bos_id()] + reference.encode(text) for text in texts]),
            ("GGUF (gguf package, llama.cpp converter logic) tokenised by llama.cpp",
             [llama.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in texts]),
        ]
        vocabulary = llama.n_vocab()
    print(f"\nextended tokenizer {folder}: {len(tokenizer):,} tokens; GGUF vocabulary {vocabulary:,} "
          f"(written in {convert_seconds:.1f} s)")
    print("| against our tokenizer.json | texts | ids differ |")
    print("|---|---:|---:|")
    for name, ids in rows:
        print(f"| {name} | {len(texts)} | {sum(a != b for a, b in zip(ours, ids))} |")


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    texts, _ = read_texts(args.files)
    loading_paths(texts)
    if args.extended_tokenizer:
        extended_agreement(Path(assets.resolve(args.extended_tokenizer)), texts + ADVERSARIAL_TEXTS)


if __name__ == "__main__":
    main()
