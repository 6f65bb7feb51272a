import gzip
import json
import sys

import pytest
from transformers import AutoTokenizer

import tokenizer_efficiency
from toolkit.corpus import read_texts
from toolkit.reports import read_json


def write_jsonl(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        for text in texts:
            stream.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def small_files(sample_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("efficiency_inputs")
    ja, _ = read_texts([sample_data / "eval" / "ja_eval.jsonl.gz"])
    en, _ = read_texts([sample_data / "eval" / "en_eval.jsonl.gz"])
    return write_jsonl(folder / "ja_small.jsonl.gz", ja[:15]), write_jsonl(folder / "en_small.jsonl.gz", en[:15])


def run(monkeypatch, *arguments):
    monkeypatch.setattr(sys, "argv", ["tokenizer_efficiency.py", *map(str, arguments)])
    tokenizer_efficiency.main()


def test_table_chart_and_report_for_several_tokenizers(monkeypatch, tmp_path, small_files, mistral_tokenizer_path,
                                                       smollm2_path, capsys):
    ja_file, en_file = small_files
    run(monkeypatch, "--tokenizers", "offline:mistral-7b-tokenizer", smollm2_path, "--names", "mistral", "smollm2",
        "--files", ja_file, en_file, "--output_dir", tmp_path)
    report = read_json(tmp_path / "efficiency_report.json")
    assert [row["name"] for row in report["tokenizers"]] == ["mistral", "smollm2"]
    table = (tmp_path / "efficiency.md").read_text(encoding="utf-8")
    assert table in capsys.readouterr().out
    assert "| tokenizer | vocabulary | ja_small chars/token | en_small chars/token |" in table
    for row, path in zip(report["tokenizers"], (mistral_tokenizer_path, smollm2_path)):
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert row["vocabulary"] == len(tokenizer)
        expected = {}
        for label, file in (("ja_small", ja_file), ("en_small", en_file)):
            texts, _ = read_texts([file])
            tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
            expected[label] = sum(map(len, texts)) / tokens
            assert row["characters_per_token"][label] == pytest.approx(expected[label])
        cells = " | ".join(f"{expected[label]:.3f}" for label in ("ja_small", "en_small"))
        assert f"| {row['name']} | {len(tokenizer):,} | {cells} |" in table
    # Mistral's SentencePiece vocabulary knows more Japanese than SmolLM2's byte-level one
    mistral, smollm2 = report["tokenizers"]
    assert mistral["characters_per_token"]["ja_small"] > smollm2["characters_per_token"]["ja_small"]
    assert (tmp_path / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_name_the_columns_and_must_match_the_files(monkeypatch, tmp_path, small_files):
    ja_file, en_file = small_files
    run(monkeypatch, "--tokenizers", "offline:mistral-7b-tokenizer", "--files", ja_file, en_file,
        "--labels", "ja", "en", "--output_dir", tmp_path)
    assert "| ja chars/token | en chars/token |" in (tmp_path / "efficiency.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="--labels has 1 entries for 2 files"):
        run(monkeypatch, "--tokenizers", "offline:mistral-7b-tokenizer", "--files", ja_file, en_file,
            "--labels", "ja", "--output_dir", tmp_path)
    with pytest.raises(ValueError, match="--names has 2 entries for 1 --tokenizers"):
        run(monkeypatch, "--tokenizers", "offline:mistral-7b-tokenizer", "--names", "a", "b",
            "--files", ja_file, "--output_dir", tmp_path)


def test_hub_mistral_is_loaded_sentencepiece_exact_and_special_strings_are_text(monkeypatch, tmp_path,
                                                                              mistral_tokenizer_path):
    """The Hub layout (tokenizer.model + a config naming LlamaTokenizer) is counted as SentencePiece
    counts it, not through transformers' LlamaTokenizer rebuild; "<s>" in a text is 3 characters."""
    import shutil

    import sentencepiece

    hub = tmp_path / "Mistral-7B-v0.1"
    hub.mkdir()
    shutil.copyfile(f"{mistral_tokenizer_path}/tokenizer.model", hub / "tokenizer.model")
    (hub / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": True, "tokenizer_class": "LlamaTokenizer"}))
    texts = [" leading space", "  two leading spaces", "a <s> inside </s> text", "日本語の<s>と</s>"]
    data = write_jsonl(tmp_path / "texts.jsonl.gz", texts)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(hub / "tokenizer.model"))
    transformers_tokens = sum(len(AutoTokenizer.from_pretrained(hub)(text, add_special_tokens=False)["input_ids"])
                              for text in texts)
    sentencepiece_tokens = sum(len(reference.encode(text)) for text in texts)
    assert transformers_tokens != sentencepiece_tokens  # the path this benchmark must not take
    run(monkeypatch, "--tokenizers", hub, "--files", data, "--labels", "x", "--output_dir", tmp_path / "out")
    (row,) = read_json(tmp_path / "out" / "efficiency_report.json")["tokenizers"]
    assert row["pipeline_from"].startswith("tokenizer.model")
    assert row["tokens"]["x"] == sentencepiece_tokens
