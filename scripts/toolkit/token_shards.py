"""Token shards: the corpus tokenised once, outside training, read memory-mapped by pretrain.py.

    tokenize_steps(tokenizer, output_folder, ...) -> [datatrove steps]
                    after any reader: each task writes `NNNNN_unshuffled.ds` (+ `.index` of document
                    ends), datatrove's tokenized-file format (`DocumentTokenizer`), and `counts/NNNNN.json`
    finalize_token_shards(output_folder, tasks=None) -> manifest dict
                    sums the per-task counts into `token_shards.json` once every task is done
                    (directly, or as the one-task stage `FinalizeTokenShards`)
    tokenize_locally(files, tokenizer, output_folder, tasks=1, workers=1) -> manifest dict
                    JSONL(.gz) files -> shards with datatrove's LocalPipelineExecutor (tests, benchmarks;
                    the mix stage runs the same steps on the data engine's executors)
    TokenBlocks(folder, block_size, per_document=True)
                    torch Dataset of `block_size`-token blocks over np.memmap views of the shards:
                    host memory O(files), not O(tokens); `[i] -> {"input_ids", "labels", "position_ids"}`
    read_manifest(folder) / tokenizer_fingerprint(tokenizer) / check_tokenizer_matches(manifest, tokenizer)

Each document is written as [BOS] text EOS (BOS when the tokenizer adds one itself, as Mistral's
does), so the model sees where documents stop. Special-token parsing is off for document text:
a document that spells "</s>" gets the ids of those characters, never the EOS id.

Blocks never cross a shard file; each file's last `tokens % block_size` tokens are not used
(counted in `TokenBlocks.stats()`). With `per_document=True` position ids restart at 0 after
every EOS and the first token of a document gets label -100 (it would be predicted from the
previous document); transformers then keeps attention inside each document (its packed-sequence
detection from position ids: flash-attention varlen, flex_attention block masks, or an SDPA mask).
"""

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer
from datatrove.utils.tokenization import load_tokenizer

from toolkit.reports import sha256_of

MANIFEST = "token_shards.json"
COUNTS_FOLDER = "counts"
IGNORE_INDEX = -100


class TokenShardError(ValueError):
    """A token-shard folder that cannot be used, with the file and what to do."""


# --------------------------------------------------------------------------- the tokenizer


def tokenizer_json(tokenizer) -> str:
    """The tokenizer.json of a tokenizer folder, Hub id or offline:NAME."""
    from toolkit import assets

    resolved = Path(assets.resolve(tokenizer))
    path = resolved / "tokenizer.json" if resolved.is_dir() else resolved
    if not path.is_file():
        if not resolved.exists():
            from huggingface_hub import hf_hub_download

            return hf_hub_download(str(tokenizer), "tokenizer.json")
        raise TokenShardError(f"{tokenizer}: no tokenizer.json in {resolved} (a fast tokenizer is needed; "
                              "save it with AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
    return str(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's tokenizer.json: what a shard folder and a checkpoint are tied to."""
    return sha256_of(tokenizer_json(tokenizer))


def tokenizer_facts(tokenizer) -> dict:
    """name, fingerprint, vocabulary size, BOS/EOS (ids and strings), whether BOS starts a document, dtype."""
    from transformers import AutoTokenizer

    from toolkit import assets

    hf = AutoTokenizer.from_pretrained(assets.resolve(tokenizer))
    if hf.eos_token_id is None:
        raise TokenShardError(f"{tokenizer}: the tokenizer has no EOS token; documents must end with one")
    adds_bos = hf.bos_token_id is not None and hf("x")["input_ids"][:1] == [hf.bos_token_id]
    vocab_size = len(hf)
    return {
        "tokenizer": str(tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "bos_token": hf.bos_token if adds_bos else None,
        "bos_token_id": hf.bos_token_id if adds_bos else None,
        "eos_token": hf.eos_token,
        "eos_token_id": hf.eos_token_id,
        "token_dtype": "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32",
    }


# --------------------------------------------------------------------------- writing (datatrove steps)


class ShardTokenizer(DocumentTokenizer):
    """datatrove's DocumentTokenizer with special-token parsing off, [BOS] text EOS per document,
    empty documents counted and skipped, and per-task counts in `counts/NNNNN.json`."""

    name = "🔢 token shards"

    def __init__(self, output_folder, facts: dict, tokenizer_file: str, batch_size: int = 256):
        # No in-file shuffle: the mix is already shuffled and training draws blocks in a seeded order.
        super().__init__(output_folder, tokenizer_file, eos_token=None, shuffle_documents=False,
                         save_final_metadata=False, batch_size=batch_size)
        self.facts = facts

    @cached_property
    def token_size(self) -> int:
        return np.dtype(self.facts["token_dtype"]).itemsize

    @cached_property
    def tokenizer(self):
        from tokenizers.processors import TemplateProcessing

        tokenizer = load_tokenizer(self.tokenizer_name_or_path)
        tokenizer.encode_special_tokens = True  # "</s>" in a document is text, not EOS
        bos, eos = self.facts["bos_token"], self.facts["eos_token"]
        special = [(eos, self.facts["eos_token_id"])]
        if bos is not None:
            special.append((bos, self.facts["bos_token_id"]))
        tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A {eos}" if bos is not None else f"$A {eos}", special_tokens=special)
        return tokenizer

    def write_unshuffled(self, data, filename):
        written = super().write_unshuffled(data, filename)
        self._task_tokens, self._task_file = len(written), filename
        return written

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.write_shard(data, rank)
        return
        yield  # a pipeline step is a generator; this one ends the pipeline

    def write_shard(self, documents, shard: int):
        """Tokenise `documents` into shard `shard` (`NNNNN_unshuffled.ds`, its `.index` and
        `counts/NNNNN.json`, written last: a shard whose counts exist is complete). The shard's name
        is the caller's, so the same documents give the same files whatever task writes them."""
        counts = {"documents": 0, "characters": 0, "skipped": {}}

        def counted(documents):
            for document in documents:
                if not document.text.strip():
                    counts["skipped"]["empty_text"] = counts["skipped"].get("empty_text", 0) + 1
                    self.stat_update("skipped_empty_text")
                    continue
                counts["documents"] += 1
                counts["characters"] += len(document.text)
                yield document

        self._task_tokens, self._task_file = 0, None
        DocumentTokenizer.run(self, counted(documents), shard, 1)
        files = [self._task_file] if self._task_tokens else []
        if self._task_file and not self._task_tokens:  # a shard that got no document leaves no file
            for name in (self._task_file, f"{self._task_file}.index"):
                if self.output_folder.exists(name):
                    self.output_folder.rm_file(name)
        record = {**counts, "task": shard, "tokens": self._task_tokens, "files": files, **self.facts}
        temporary = f"{COUNTS_FOLDER}/.tmp.{shard:05d}.json"
        with self.output_folder.open(temporary, "wt") as stream:
            json.dump(record, stream)
        self.output_folder.mv(temporary, f"{COUNTS_FOLDER}/{shard:05d}.json")


def tokenize_steps(tokenizer, output_folder, batch_size: int = 256) -> list:
    """The datatrove steps (after a reader) that write token shards of `tokenizer` into `output_folder`.
    `batch_size` documents are encoded at once: the tokeniser's memory is bounded by the batch
    (tokenizers' Encoding objects are ~100 bytes per token), never by the corpus."""
    return [ShardTokenizer(str(output_folder), tokenizer_facts(tokenizer), tokenizer_json(tokenizer),
                           batch_size=batch_size)]


# --------------------------------------------------------------------------- the manifest


def finalize_token_shards(output_folder, tasks: int = None) -> dict:
    """Sum the per-task counts into `token_shards.json` (atomically); a clear error if a task is missing
    or its shard does not hold the tokens it counted."""
    folder = Path(output_folder)
    count_files = sorted((folder / COUNTS_FOLDER).glob("[0-9]*.json"))
    if not count_files:
        raise TokenShardError(f"{folder / COUNTS_FOLDER}: no per-task counts; run tokenize_steps first")
    records = [json.loads(path.read_text(encoding="utf-8")) for path in count_files]
    if tasks is not None:
        missing = sorted(set(range(tasks)) - {record["task"] for record in records})
        if missing:
            raise TokenShardError(f"{folder}: tasks {missing[:10]} of {tasks} have not finished (no counts/NNNNN.json); "
                                  "rerun the tokenisation stage, which resumes the missing tasks")
    facts_keys = ("tokenizer", "tokenizer_fingerprint", "vocab_size", "bos_token", "bos_token_id", "eos_token",
                  "eos_token_id", "token_dtype")
    facts = {key: records[0][key] for key in facts_keys}
    for path, record in zip(count_files, records):
        if record["tokenizer_fingerprint"] != facts["tokenizer_fingerprint"]:
            raise TokenShardError(f"{path}: written with another tokenizer than {count_files[0]}; "
                                  f"one folder holds one tokenizer's shards: delete {folder} and tokenise again")
    itemsize = np.dtype(facts["token_dtype"]).itemsize
    files, skipped = [], {}
    for record in records:
        for name in record["files"]:
            size = (folder / name).stat().st_size if (folder / name).exists() else None
            if size != record["tokens"] * itemsize:
                raise TokenShardError(f"{folder / name}: {size} bytes, but task {record['task']} counted "
                                      f"{record['tokens']} tokens of {itemsize} bytes; tokenise again")
            files.append({"name": name, "tokens": record["tokens"], "documents": record["documents"]})
        for reason, count in record["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    manifest = {
        **facts,
        "documents": sum(record["documents"] for record in records),
        "tokens": sum(record["tokens"] for record in records),
        "characters": sum(record["characters"] for record in records),
        "skipped": skipped,
        "tasks": len(records),
        "files": sorted(files, key=lambda entry: entry["name"]),
        "format": "datatrove tokenized files (.ds little-endian token ids, .ds.index uint64 document ends); "
                  "every document [BOS] text EOS; special-token parsing off",
    }
    if manifest["tokens"] == 0:
        raise TokenShardError(f"{folder}: the corpus has no non-empty document")
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, folder / MANIFEST)
    return manifest


class FinalizeTokenShards(PipelineStep):
    """`finalize_token_shards` as a one-task datatrove stage (chain it with `depends=` after tokenising)."""

    name = "🧾 token shard manifest"

    def __init__(self, output_folder, tasks: int = None):
        super().__init__()
        self.output_folder, self.tasks = str(output_folder), tasks

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        finalize_token_shards(self.output_folder, self.tasks)
        return
        yield


class JsonlFiles(PipelineStep):
    """A reader of JSONL(.gz) files through `toolkit.corpus` (a bad line fails naming the file and line),
    the files split across tasks."""

    name = "📄 JSONL files"

    def __init__(self, files, text_key: str = "text"):
        super().__init__()
        self.files, self.text_key = [str(path) for path in files], text_key

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datatrove.data import Document

        from toolkit.corpus import ReadStats, iter_records

        for path in self.files[rank::world_size]:
            for line, record in iter_records(path, self.text_key, False, ReadStats()):
                self.stat_update("documents")
                yield Document(text=record[self.text_key], id=f"{path}:{line}")


def tokenize_locally(files, tokenizer, output_folder, tasks: int = 1, workers: int = 1, text_key: str = "text") -> dict:
    """JSONL(.gz) files -> a finished token-shard folder, on this machine (tests, benchmarks, small corpora;
    the mix stage runs `tokenize_steps` on the data engine's executors)."""
    from datatrove.executor import LocalPipelineExecutor

    output_folder = Path(output_folder)
    LocalPipelineExecutor(pipeline=[JsonlFiles(files, text_key), *tokenize_steps(tokenizer, output_folder)],
                          tasks=tasks, workers=workers, logging_dir=str(output_folder / "logs"),
                          skip_completed=True).run()
    return finalize_token_shards(output_folder, tasks)


# --------------------------------------------------------------------------- reading (pretrain.py)


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise TokenShardError(f"{path}: no token-shard manifest. Tokenise the corpus first (the mix stage's "
                              "token shards, or toolkit.token_shards.tokenize_locally) and point --train_token_dir "
                              "at the folder that holds token_shards.json")
    return json.loads(path.read_text(encoding="utf-8"))


def check_tokenizer_matches(manifest: dict, tokenizer, folder, tokenizer_name) -> None:
    """TokenShardError unless the shards were written with this very tokenizer."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if manifest["tokenizer_fingerprint"] != fingerprint:
        raise TokenShardError(
            f"{Path(folder) / MANIFEST}: the shards were tokenised with {manifest['tokenizer']} "
            f"(tokenizer.json sha256 {manifest['tokenizer_fingerprint'][:12]}), not with {tokenizer_name} "
            f"(sha256 {fingerprint[:12]}): tokenise the corpus with this tokenizer or pass the one it was made with")


def document_positions(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Position of each token inside its document: 0 after every EOS (and at the block's start)."""
    length = len(input_ids)
    starts = np.zeros(length, dtype=np.int64)
    after_eos = np.flatnonzero(input_ids[:-1] == eos_token_id) + 1
    starts[after_eos] = after_eos
    return np.arange(length, dtype=np.int64) - np.maximum.accumulate(starts)


class TokenBlocks(torch.utils.data.Dataset):
    """Blocks of `block_size` tokens over memory-mapped shards (each file opened on first use)."""

    def __init__(self, folder, block_size: int, per_document: bool = True):
        self.folder, self.block_size, self.per_document = Path(folder), block_size, per_document
        self.manifest = read_manifest(folder)
        self.dtype = np.dtype(self.manifest["token_dtype"])
        self.eos_token_id = self.manifest["eos_token_id"]
        self.files = [entry["name"] for entry in self.manifest["files"]]
        for name, entry in zip(self.files, self.manifest["files"]):
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != entry["tokens"] * self.dtype.itemsize:
                raise TokenShardError(f"{path}: missing or not {entry['tokens']} tokens as {MANIFEST} says; "
                                      "tokenise again")
        per_file = [entry["tokens"] // block_size for entry in self.manifest["files"]]
        self.first_block = np.cumsum([0] + per_file)
        self._maps = {}

    def __len__(self):
        return int(self.first_block[-1])

    def stats(self) -> dict:
        used = len(self) * self.block_size
        return {"folder": str(self.folder), "files": len(self.files), "documents": self.manifest["documents"],
                "tokens": self.manifest["tokens"], "characters": self.manifest["characters"],
                "characters_per_token": self.manifest["characters"] / self.manifest["tokens"],
                "blocks": len(self), "block_size": self.block_size, "tokens_in_blocks": used,
                "tokens_unused_at_file_ends": self.manifest["tokens"] - used,
                "tokenizer_fingerprint": self.manifest["tokenizer_fingerprint"]}

    def _map(self, index):
        if index not in self._maps:
            self._maps[index] = np.memmap(self.folder / self.files[index], dtype=self.dtype, mode="r")
        return self._maps[index]

    def __getitem__(self, block):
        if not 0 <= block < len(self):
            raise IndexError(block)
        index = int(np.searchsorted(self.first_block, block, side="right") - 1)
        start = (block - int(self.first_block[index])) * self.block_size
        ids = np.asarray(self._map(index)[start:start + self.block_size], dtype=np.int64)
        input_ids = torch.from_numpy(ids)
        if not self.per_document:
            return {"input_ids": input_ids, "labels": input_ids.clone()}
        positions = torch.from_numpy(document_positions(ids, self.eos_token_id))
        labels = input_ids.clone()
        labels[positions == 0] = IGNORE_INDEX  # a document's first token is not predicted from the previous one
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}

    def __getstate__(self):  # memmaps are reopened in a DataLoader worker
        return {**self.__dict__, "_maps": {}}
