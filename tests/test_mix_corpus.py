"""scripts/mix_corpus.py: English at a share of tokens measured with the training tokenizer."""

import gzip
import json

import pytest
from transformers import AutoTokenizer

import mix_corpus
from toolkit.corpus import CorpusError


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory, sample_data):
    folder = tmp_path_factory.mktemp("mix_inputs")

    def take(source, name, count):
        with gzip.open(sample_data / source, "rt", encoding="utf-8") as f:
            lines = [line for _, line in zip(range(count), f)]
        (folder / name).write_text("".join(lines), encoding="utf-8")
        return str(folder / name)

    return {"ja": take("pool/data/ja/ja_clean_0000.jsonl.gz", "ja.jsonl", 60),
            "en": take("pool/data/en/en_clean_0000.jsonl.gz", "en.jsonl", 80)}


def run(tmp_path, tokenizer, ja, en, *extra, out="out"):
    out_dir = tmp_path / out
    mix_corpus.main(["--japanese_files", ja, "--english_files", en, "--tokenizer", str(tokenizer),
                     "--output_dir", str(out_dir), *extra])
    records = [json.loads(line) for line in (out_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return out_dir, records, json.loads((out_dir / "mix_report.json").read_text())


def test_english_reaches_the_token_share_with_the_fewest_documents(tmp_path, mistral_tokenizer_path, small_inputs):
    out_dir, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"],
                                   "--english_token_share", "0.2")
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_path)
    tokens = {"ja": 0, "en": 0}
    for record in records:
        tokens[record["lang"]] += len(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
    assert tokens == {"ja": report["tokens"]["ja"], "en": report["tokens"]["en"]}
    share = tokens["en"] / (tokens["en"] + tokens["ja"])
    assert share >= 0.2 and report["english_share"]["achieved"] == pytest.approx(share, abs=1e-5)
    # English is taken in file order and stops as soon as the share is reached
    english_texts = [json.loads(line)["text"] for line in open(small_inputs["en"], encoding="utf-8")]
    used = report["documents"]["en"]
    assert {r["text"] for r in records if r["lang"] == "en"} == set(english_texts[:used])
    last = len(tokenizer(english_texts[used - 1], add_special_tokens=False)["input_ids"])
    assert (tokens["en"] - last) / (tokens["en"] - last + tokens["ja"]) < 0.2
    assert report["documents"]["ja"] == 60


def test_records_keep_their_fields_and_the_shuffle_follows_the_seed(tmp_path, mistral_tokenizer_path, small_inputs):
    _, first, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "1", out="a")
    _, again, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "1", out="b")
    _, other, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "2", out="c")
    assert first == again and first != other and sorted(map(json.dumps, first)) == sorted(map(json.dumps, other))
    assert all({"text", "source", "origin", "lang"} <= set(r) for r in first)
    assert {r["lang"] for r in first} == {"ja", "en"}
    langs = [r["lang"] for r in first]
    assert langs != sorted(langs, key=lambda lang: lang != "ja")  # shuffled, not all Japanese first


def test_a_bigger_vocabulary_changes_how_much_english_is_needed(tmp_path, mistral_tokenizer_path, smollm2_path,
                                                                 small_inputs):
    _, _, mistral = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], out="m")
    _, _, smollm = run(tmp_path, smollm2_path, small_inputs["ja"], small_inputs["en"], out="s")
    assert mistral["tokens"]["ja"] != smollm["tokens"]["ja"]
    for report in (mistral, smollm):
        assert report["english_share"]["achieved"] >= 0.1 and report["english_share"]["reached"]


def test_not_enough_english_is_an_error_or_a_reported_lower_share(tmp_path, mistral_tokenizer_path, small_inputs):
    with pytest.raises(SystemExit, match="--allow_lower_english_share"):
        run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--english_token_share", "0.9")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # nothing half-written
    _, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"],
                             "--english_token_share", "0.9", "--allow_lower_english_share", out="low")
    assert report["english_share"]["reached"] is False and report["english_share"]["achieved"] < 0.9
    assert report["documents"]["en"] == 80 == sum(r["lang"] == "en" for r in records)


def test_bad_english_line_names_the_file_and_line(tmp_path, mistral_tokenizer_path, small_inputs):
    bad = tmp_path / "bad_en.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=f"{bad}:2: "):
        run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], str(bad), "--english_token_share", "0.5")
    _, _, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], str(bad), "--english_token_share", "0.5",
                       "--skip_bad_records", "--allow_lower_english_share", out="skip")
    assert report["skipped_bad_records"]["en"] == {"text_not_string": 1}
