"""toolkit/token_shards.py: the corpus tokenised by datatrove steps into memory-mapped shards, with a
manifest whose counts add up, special-token parsing off, and blocks whose positions restart per document."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from toolkit import token_shards
from toolkit.token_shards import IGNORE_INDEX, TokenBlocks, TokenShardError, document_positions

TEXTS = ["日本語の設定ファイル。" * 3, "", "An English sentence that spells </s> and <s> as text.",
         "コマンドをインストールする。", "   ", "最後の文書。"]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl")
    paths = []
    for index, texts in enumerate((TEXTS[:3], TEXTS[3:])):
        path = folder / f"part{index}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shards(corpus_files, tiny_mistral_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return folder, token_shards.tokenize_locally(corpus_files, tiny_mistral_path, folder, tasks=2)


def expected_documents(tokenizer):
    return [tokenizer(text, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
            for text in TEXTS if text.strip()]


def test_manifest_counts_every_document_token_and_character(shards, tiny_mistral_path):
    folder, manifest = shards
    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path)
    documents = expected_documents(tokenizer)
    assert manifest["documents"] == 4 and manifest["skipped"] == {"empty_text": 2}
    assert manifest["tokens"] == sum(map(len, documents))
    assert manifest["characters"] == sum(len(text) for text in TEXTS if text.strip())
    assert manifest["tokenizer_fingerprint"] == token_shards.tokenizer_fingerprint(tiny_mistral_path)
    assert manifest["vocab_size"] == len(tokenizer) and manifest["token_dtype"] == "uint16"
    assert (manifest["bos_token_id"], manifest["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert json.loads((folder / "token_shards.json").read_text()) == manifest
    assert sum(entry["tokens"] for entry in manifest["files"]) == manifest["tokens"]


def test_documents_are_bos_text_eos_with_special_tokens_as_text(shards, tiny_mistral_path):
    folder, manifest = shards
    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path)
    written = np.concatenate([np.fromfile(folder / entry["name"], dtype=np.uint16) for entry in manifest["files"]])
    documents = expected_documents(tokenizer)
    assert written.tolist() == [token for ids in documents for token in ids]
    assert [ids[0] for ids in documents] == [tokenizer.bos_token_id] * 4
    # "</s>" spelled in a document is characters, not a document end: exactly one EOS per document
    assert int((written == tokenizer.eos_token_id).sum()) == 4
    ends = np.concatenate([np.fromfile(folder / f"{entry['name']}.index", dtype=np.uint64)
                           for entry in manifest["files"]])
    assert len(ends) == 4  # datatrove's index of document ends


def test_blocks_restart_positions_after_eos_and_mask_document_starts(shards, tiny_mistral_path):
    folder, manifest = shards
    blocks = TokenBlocks(folder, block_size=8)
    assert len(blocks) == sum(entry["tokens"] // 8 for entry in manifest["files"])
    eos = manifest["eos_token_id"]
    for index in range(len(blocks)):
        block = blocks[index]
        ids, positions, labels = block["input_ids"], block["position_ids"], block["labels"]
        assert len(ids) == 8 and positions[0] == 0
        for t in range(1, 8):
            assert positions[t] == (0 if ids[t - 1] == eos else positions[t - 1] + 1)
        assert (labels == IGNORE_INDEX).tolist() == (positions == 0).tolist()
    plain = TokenBlocks(folder, block_size=8, per_document=False)[1]
    assert plain.keys() == {"input_ids", "labels"} and plain["labels"].tolist() == plain["input_ids"].tolist()
    assert blocks.stats()["tokens_unused_at_file_ends"] == manifest["tokens"] - len(blocks) * 8


def test_document_positions():
    assert document_positions(np.array([5, 2, 7, 8, 2, 2, 9]), 2).tolist() == [0, 1, 0, 1, 2, 0, 0]


def test_finalize_names_missing_tasks_and_damaged_shards(shards, tmp_path):
    import shutil

    folder, manifest = shards
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with pytest.raises(TokenShardError, match=r"tasks \[2\] of 3 have not finished"):
        token_shards.finalize_token_shards(copy, tasks=3)
    first = copy / manifest["files"][0]["name"]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(TokenShardError, match="tokenise again"):
        token_shards.finalize_token_shards(copy, tasks=2)
    with pytest.raises(TokenShardError, match="tokenise again"):
        TokenBlocks(copy, block_size=8)


def test_shards_refuse_another_tokenizer(shards, smollm2_path):
    folder, manifest = shards
    with pytest.raises(TokenShardError, match="tokenised with"):
        token_shards.check_tokenizer_matches(manifest, smollm2_path, folder, "offline:smollm2-135m")
    with pytest.raises(TokenShardError, match="no token-shard manifest"):
        TokenBlocks(folder / "counts", block_size=8)
