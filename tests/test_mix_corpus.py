"""scripts/mix_corpus.py: English at a share of tokens measured with the training tokenizer."""

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoTokenizer

import mix_corpus
from toolkit import mixing
from toolkit.corpus import CorpusError
from test_data_engine import _alive  # a process is alive (not a zombie): one check for both kill tests


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
    records = []  # the text shards' records, shard by shard
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
    # the English share counts only the English kept: the dropped documents' tokens are not in it
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_path)
    kept_english = [record["text"] for record in records if record["lang"] == "en"]
    assert report["tokens"]["en"] == sum(len(ids) for ids in tokenizer(kept_english, add_special_tokens=False)[
        "input_ids"])
    assert report["english_share"]["achieved"] >= 0.2
    last_used = max(english.index(text) for text in kept_english)  # read = kept + dropped, up to the cutoff
    assert last_used + 1 == report["documents"]["en"] + 2
    # the same mix, text and token shards, from another task split
    other, _, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--english_token_share",
                      "0.2", "--decontaminate_against", str(task), "tiny_lm_eval_task", "--lm_eval_include_path",
                      str(include), out="three_tasks", tasks=3, workers=2)
    assert text_files(other) == text_files(out_dir)
    assert token_files(other / "tokens")[0] == token_files(out_dir / "tokens")[0]


# ----- issue 20: the mix at MADLAD scale ---------------------------------------------------------
POOL_JA = "sample_data/pool/data/ja/ja_clean_0000.jsonl.gz"
POOL_EN = "sample_data/pool/data/en/en_clean_0000.jsonl.gz"


def token_files(folder):
    """Every token shard file (and index) by name, and the manifest."""
    names = sorted(n for n in os.listdir(folder) if n.endswith((".ds", ".ds.index")))
    return {n: (folder / n).read_bytes() for n in names}, json.loads((folder / "token_shards.json").read_text())


def text_files(out_dir):
    return {n: (out_dir / "text" / n).read_bytes() for n in sorted(os.listdir(out_dir / "text"))}


def mix_command(out_dir, tokenizer, tasks=2, workers=2):
    return [sys.executable, "scripts/mix_corpus.py", "--japanese_files", POOL_JA, "--english_files", POOL_EN,
            "--tokenizer", str(tokenizer), "--output_dir", str(out_dir), "--tasks", str(tasks),
            "--workers", str(workers)]


@pytest.fixture(scope="module")
def reference_mix(tmp_path_factory, mistral_tokenizer_path):
    out_dir = tmp_path_factory.mktemp("reference") / "out"
    mix_corpus.main(mix_command(out_dir, mistral_tokenizer_path, tasks=1, workers=1)[2:])
    return out_dir


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    if int(stream.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


@pytest.mark.parametrize("stage, evidence", [("scatter", ".tmp/*/logs/scatter"), ("shuffle", ".tmp/*/logs/shuffle"),
                                             ("tokens", "tokens/.logs/tokens"),
                                             ("manifest", "tokens/.logs/manifest")])
def test_sigkill_during_each_mix_stage_then_the_same_command(tmp_path, mistral_tokenizer_path, reference_mix, stage,
                                                             evidence):
    out_dir = tmp_path / "killed"
    command = mix_command(out_dir, mistral_tokenizer_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    workers = set()
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        workers.update(_children(process.pid))
        if list(out_dir.glob(evidence)):
            os.kill(process.pid, signal.SIGKILL)  # the main process only: its workers must follow it
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run finished before {stage} could be killed"
    until = time.time() + 15
    while time.time() < until and any(map(_alive, workers)):
        time.sleep(0.1)
    assert not any(map(_alive, workers)), "a worker outlived the killed mix"
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    assert text_files(out_dir) == text_files(reference_mix)
    shards, manifest = token_files(out_dir / "tokens")
    assert shards == token_files(reference_mix / "tokens")[0]
    report = json.loads((out_dir / "mix_report.json").read_text())
    assert manifest["documents"] == report["documents"]["total"] == sum(1 for _ in read_mix(out_dir))
    assert manifest["tokens"] == report["tokens"]["total"] + 2 * report["documents"]["total"]  # <s> text </s>
    assert not (out_dir / ".tmp").exists() and not list(out_dir.glob("**/.tmp.*"))


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_token_shards_are_the_same_files_for_any_task_count_and_executor(tmp_path, mistral_tokenizer_path,
                                                                         reference_mix, executor):
    expected = token_files(reference_mix / "tokens")[0]
    splits = [(3, 2), (7, 2)] if executor == "local" else [(3, 2)]  # one Ray start: it is slow on 2 cores
    for tasks, workers in splits:
        out_dir = tmp_path / f"{executor}_{tasks}"
        mix_corpus.main([*mix_command(out_dir, mistral_tokenizer_path, tasks, workers)[2:], "--executor", executor])
        assert text_files(out_dir) == text_files(reference_mix)
        shards, manifest = token_files(out_dir / "tokens")
        assert shards == expected and len(shards) > 2, (executor, tasks)


def test_a_rerun_with_fewer_workers_recounts_nothing(tmp_path, mistral_tokenizer_path, reference_mix, monkeypatch):
    out_dir = tmp_path / "out"
    mix_corpus.main(mix_command(out_dir, mistral_tokenizer_path, tasks=3, workers=2)[2:])

    def recounted(*args, **kwargs):
        raise AssertionError("tokens counted again")

    monkeypatch.setattr(mixing, "count_tokens", recounted)
    mix_corpus.main(mix_command(out_dir, mistral_tokenizer_path, tasks=1, workers=1)[2:])  # e.g. after an OOM
    assert text_files(out_dir) == text_files(reference_mix)
    assert token_files(out_dir / "tokens")[0] == token_files(reference_mix / "tokens")[0]


def test_back_to_an_earlier_mix_rebuilds_its_token_shards(tmp_path, mistral_tokenizer_path, small_inputs):
    first, _, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "0")
    before = token_files(first / "tokens")
    run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "1")
    _, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], "--seed", "0")
    assert token_files(first / "tokens") == before and before[1]["documents"] == report["documents"]["total"]


def test_english_is_tokenised_only_as_far_as_the_share_needs(tmp_path, mistral_tokenizer_path, small_inputs):
    english = []
    for copy in range(10):  # ten English files, distinct documents
        path = tmp_path / f"en_{copy}.jsonl"
        path.write_text("".join(json.dumps({"text": json.loads(line)["text"] + f" (copy {copy})"}) + "\n"
                                for line in open(small_inputs["en"], encoding="utf-8")), encoding="utf-8")
        english.append(str(path))
    out_dir = tmp_path / "out"
    mix_corpus.main(["--japanese_files", small_inputs["ja"], "--english_files", *english, "--tokenizer",
                     str(mistral_tokenizer_path), "--output_dir", str(out_dir), "--tasks", "1", "--workers", "1",
                     "--english_token_share", "0.3"])
    report = json.loads((out_dir / "mix_report.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_path)
    per_file = [sum(len(ids) for ids in tokenizer([json.loads(line)["text"] for line in open(path, encoding="utf-8")],
                                                  add_special_tokens=False, split_special_tokens=True)["input_ids"])
                for path in english]
    used_files = next(i for i in range(10) if sum(per_file[:i + 1]) >= report["english_share"]["english_tokens_needed"])
    counted = report["english_share"]["english_tokens_counted"]
    assert report["english_share"]["reached"] and used_files < 9
    assert report["tokens"]["en"] <= counted <= sum(per_file[:used_files + 1]) < sum(per_file)


def test_the_bucket_count_follows_the_size_without_a_task_cap(tmp_path, mistral_tokenizer_path, small_inputs):
    out_dir, records, report = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"],
                                   "--shuffle_bucket_mb", "0.004", tasks=2, workers=2)
    buckets = report["shuffle"]["buckets"]
    assert buckets == math.ceil(report["shuffle"]["kept_bytes"] / (0.004 * 2**20)) > 16
    assert len(os.listdir(out_dir / "text")) > 16
    manifest = json.loads((out_dir / "tokens" / "token_shards.json").read_text())
    assert manifest["tasks"] == buckets and manifest["documents"] == len(records) == report["documents"]["total"]


def test_inputs_that_cannot_work_are_refused_in_one_line(tmp_path, mistral_tokenizer_path, small_inputs):
    ja_dir = os.path.dirname(small_inputs["ja"])
    respelled = os.path.join(ja_dir, "..", os.path.basename(ja_dir), "ja.jsonl")
    with pytest.raises(SystemExit, match="is both a Japanese .* and an English input"):
        run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], respelled)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], out="a_file")
    with pytest.raises(SystemExit, match="--tokenizer .*no_such_tokenizer: cannot load a tokenizer"):
        run(tmp_path, str(tmp_path / "no_such_tokenizer"), small_inputs["ja"], small_inputs["en"])
    out_dir, _, _ = run(tmp_path, mistral_tokenizer_path, small_inputs["ja"], small_inputs["en"], out="mix")
    with pytest.raises(SystemExit, match="is inside --output_dir"):  # a mix of its own output
        run(tmp_path, mistral_tokenizer_path, str(out_dir / "text" / "*.jsonl.gz"), small_inputs["en"], out="mix")
    assert (out_dir / "mix_report.json").exists() and (out_dir / "tokens" / "token_shards.json").exists()
