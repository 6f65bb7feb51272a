"""scripts/mix_corpus.py: English at a share of tokens measured with the training tokenizer."""

import gzip
import json
import os

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


def read_mix(out_dir):
    records = []
    for name in sorted(os.listdir(out_dir / "text")):
        with gzip.open(out_dir / "text" / name, "rt", encoding="utf-8") as stream:
            records.extend(json.loads(line) for line in stream)
    return records


def run(tmp_path, tokenizer, ja, en, *extra, out="out", tasks=1, workers=1):
    out_dir = tmp_path / out
    mix_corpus.main(["--japanese_files", *([ja] if isinstance(ja, str) else ja), "--english_files", en,
                     "--tokenizer", str(tokenizer), "--output_dir", str(out_dir), "--tasks", str(tasks),
                     "--workers", str(workers), *extra])
    return out_dir, read_mix(out_dir), json.loads((out_dir / "mix_report.json").read_text())


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
    assert not (out_dir / ".tmp").exists()  # temporary files removed


def test_the_mix_is_the_same_for_any_task_count_and_follows_the_seed(tmp_path, mistral_tokenizer_path, small_inputs):
    first, records, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "1",
                            out="a")
    four, _, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "1", out="b",
                     tasks=4, workers=2)
    _, other, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "2", out="c")
    shards = sorted(os.listdir(first / "text"))
    assert shards == sorted(os.listdir(four / "text")) and len(shards) > 1
    assert all((first / "text" / s).read_bytes() == (four / "text" / s).read_bytes() for s in shards)
    assert records != other and sorted(map(json.dumps, records)) == sorted(map(json.dumps, other))
    assert all({"text", "source", "origin", "lang"} <= set(r) for r in records)
    langs = [r["lang"] for r in records]
    assert set(langs) == {"ja", "en"} and langs != sorted(langs, key=lambda lang: lang != "ja")  # shuffled


def test_special_token_strings_in_documents_are_counted_as_text(tmp_path, mistral_tokenizer_path):
    ja = tmp_path / "ja.jsonl"
    ja.write_text(json.dumps({"text": "これは <s> と </s> を含む文書です。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    en = tmp_path / "en.jsonl"
    en.write_text('{"text": "plain English"}\n', encoding="utf-8")
    _, _, report = run(tmp_path, mistral_tokenizer_path, str(ja), str(en), "--english_token_share", "0",)
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_path)
    as_text = tokenizer("これは <s> と </s> を含む文書です。", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert report["tokens"]["ja"] == len(as_text) and tokenizer.bos_token_id not in as_text


def test_an_existing_lang_field_is_kept_unless_told(tmp_path, mistral_tokenizer_path, small_inputs):
    ja = tmp_path / "ja.jsonl"
    ja.write_text("".join(json.dumps({**json.loads(line), "lang": "ja-JP"}, ensure_ascii=False) + "\n"
                          for line in open(small_inputs["ja"], encoding="utf-8")), encoding="utf-8")
    _, records, report = run(tmp_path, mistral_tokenizer_path, str(ja), small_inputs["en"])
    english_with_lang = all("lang" in json.loads(line) for line in open(small_inputs["en"], encoding="utf-8"))
    assert {r["lang"] for r in records} == {"ja-JP", "en"}
    assert report["lang_field"]["existing_kept"] == 60 + english_with_lang * report["documents"]["en"]
    _, records, _ = run(tmp_path, mistral_tokenizer_path, str(ja), small_inputs["en"], "--overwrite_lang", out="o")
    assert {r["lang"] for r in records} == {"ja", "en"}


def test_a_rerun_with_another_bucket_count_starts_clean(tmp_path, mistral_tokenizer_path, small_inputs):
    out_dir, _, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"],
                        "--shuffle_buckets", "8")
    (out_dir / ".tmp" / "leftover-of-a-killed-run").mkdir(parents=True)  # e.g. SIGKILL with another bucket count
    (out_dir / ".tmp" / "leftover-of-a-killed-run" / "x.jsonl").write_text("{}\n")
    _, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"],
                             "--shuffle_buckets", "3")
    assert sorted(os.listdir(out_dir / "text")) == ["00000.jsonl.gz", "00001.jsonl.gz", "00002.jsonl.gz"]
    assert len(records) == report["documents"]["total"] and not (out_dir / ".tmp").exists()


def test_a_bigger_vocabulary_changes_how_much_english_is_needed(tmp_path, mistral_tokenizer_path, smollm2_path,
                                                                 small_inputs):
    _, _, mistral = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], out="m")
    _, _, smollm = run(tmp_path, smollm2_path, small_inputs["ja"], small_inputs["en"], out="s")
    assert mistral["tokens"]["ja"] != smollm["tokens"]["ja"]
    for report in (mistral, smollm):
        assert report["english_share"]["achieved"] >= 0.1 and report["english_share"]["reached"]


def test_not_enough_english_is_an_error_or_a_reported_lower_share(tmp_path, mistral_tokenizer_path, small_inputs):
    with pytest.raises(CorpusError, match="--allow_lower_english_share"):
        run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--english_token_share", "0.9")
    assert not (tmp_path / "out" / "text").exists() and not (tmp_path / "out" / ".tmp").exists()
    _, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"],
                             "--english_token_share", "0.9", "--allow_lower_english_share", out="low")
    assert report["english_share"]["reached"] is False and report["english_share"]["achieved"] < 0.9
    assert report["documents"]["en"] == 80 == sum(r["lang"] == "en" for r in records)


@pytest.mark.parametrize("bad_line, reason", [('{"text": 5}', "text_not_string"),
                                              ('{"text": "\\udc80 lone"}', "lone_surrogate")])
def test_bad_english_line_names_the_file_and_line(tmp_path, mistral_tokenizer_path, small_inputs, bad_line, reason):
    bad = tmp_path / "bad_en.jsonl"
    bad.write_text('{"text": "fine"}\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=f"{bad}:2: "):
        run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], str(bad), "--english_token_share", "0.5")
    _, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], str(bad), "--english_token_share",
                             "0.5", "--skip_bad_records", "--allow_lower_english_share", out="skip")
    assert report["skipped_bad_records"]["en"] == {reason: 1} and len(records) == 61


def test_bad_arguments_are_refused_before_any_work(tmp_path, mistral_tokenizer_path, small_inputs):
    for extra, message in ((["--shuffle_buckets", "0"], "--shuffle_buckets"),
                           (["--extra_tokenizers", "nolabel"], "LABEL=TOKENIZER"),
                           (["--english_token_share", "1"], "--english_token_share")):
        with pytest.raises(SystemExit, match=message):
            run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], *extra)
    assert not (tmp_path / "out").exists()


def test_token_shards_of_the_training_and_the_extra_tokenizers(tmp_path, mistral_tokenizer_path, smollm2_path,
                                                               small_inputs):
    out_dir, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"],
                                   "--extra_tokenizers", f"base={smollm2_path}", tasks=2, workers=2)
    assert report["token_shards"] == {"training": str(out_dir / "tokens"), "base": str(out_dir / "tokens-base")}
    training = json.loads((out_dir / "tokens" / "token_shards.json").read_text())
    base = json.loads((out_dir / "tokens-base" / "token_shards.json").read_text())
    per_document = 1 + (training["bos_token_id"] is not None)  # [BOS] text EOS
    assert training["documents"] == base["documents"] == len(records) == report["documents"]["total"]
    assert training["tokens"] == report["tokens"]["total"] + per_document * len(records)
    assert training["characters"] == base["characters"] == sum(len(r["text"]) for r in records)
    assert base["vocab_size"] == len(AutoTokenizer.from_pretrained(smollm2_path)) != training["vocab_size"]


def test_documents_of_both_languages_overlapping_an_eval_item_are_dropped(tmp_path, mistral_tokenizer_path,
                                                                         small_inputs, lm_eval_task_yaml):
    """--decontaminate_against drops Japanese and English documents that share a 13-unit n-gram with a
    task item, whether the task is a JSONL file or an lm-eval task (here a local YAML over a JSONL)."""
    english = [json.loads(line)["text"] for line in open(small_inputs["en"], encoding="utf-8")]
    japanese = [json.loads(line)["text"] for line in open(small_inputs["ja"], encoding="utf-8")]
    quote = " ".join(english[2].split()[5:25])  # 20 English words
    task = tmp_path / "home_task.jsonl"
    start = next(i for i in range(len(japanese[4])) if all(ord(c) > 127 for c in japanese[4][i:i + 20]))
    task.write_text(json.dumps({"prompt": "Q: " + quote, "reference": japanese[4][start:start + 20]},
                               ensure_ascii=False) + "\n", encoding="utf-8")  # 20 Japanese characters
    include = tmp_path / "lm_eval"
    include.mkdir()
    lm_eval_task_yaml(include, "tiny_lm_eval_task", [{"question": " ".join(english[5].split()[3:20]).upper(), "answer": "x"}])
    out_dir, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"],
                                   "--english_token_share", "0.2", "--decontaminate_against", str(task),
                                   "tiny_lm_eval_task", "--lm_eval_include_path", str(include))
    texts = {record["text"] for record in records}
    assert japanese[4] not in texts and english[2] not in texts and english[5] not in texts
    assert report["decontamination"]["documents_dropped_per_task"] == {
        "ja": {"home_task": 1}, "en": {"home_task": 1, "tiny_lm_eval_task": 1}}
    assert report["skipped_bad_records"] == {"ja": {}, "en": {}}  # drops are not bad records
    assert report["documents"]["ja"] == 59 and english[3] in texts  # the English goes on past the dropped ones
    assert (out_dir / "decontamination" / "tiny_lm_eval_task.jsonl").is_file()
