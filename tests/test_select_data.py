"""scripts/select_data.py and toolkit/selection.py on tiny real inputs (the bundled Debian corpus)."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from data_selection.hashed_ngram_dsir import get_ngram_counts

import select_data
from toolkit import data_engine, selection
from toolkit.corpus import CorpusError, read_texts

POOL_JA = "sample_data/pool/data/ja/ja_clean_0000.jsonl.gz"
POOL_EN = "sample_data/pool/data/en/en_clean_0000.jsonl.gz"
TARGET = "sample_data/target/ja_target.jsonl.gz"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ja_texts(sample_data):
    texts, _ = read_texts([sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz"])
    return texts


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


def arguments(tmp_path, *extra, raw=(POOL_JA,), target=(TARGET,), k=40, out="out", tasks=1, workers=1):
    return ["--raw_datasets", *map(str, raw), "--target_datasets", *map(str, target), "--num_to_sample", str(k),
            "--output_dir", str(tmp_path / out), "--tasks", str(tasks), "--workers", str(workers), *map(str, extra)]


def run(tmp_path, *extra, out="out", **kwargs):
    select_data.main(arguments(tmp_path, *extra, out=out, **kwargs))
    out_dir = tmp_path / out
    return out_dir, json.loads((out_dir / "selection_report.json").read_text())


def selected_lines(out_dir):
    """Every selected line, shard by shard (shards are named by raw file index, in order)."""
    lines = []
    for name in sorted(os.listdir(out_dir / "selected")):
        with gzip.open(out_dir / "selected" / name, "rt", encoding="utf-8") as stream:
            lines.extend(stream.read().splitlines())
    return lines


def selected_bytes(out_dir):
    return {name: (out_dir / "selected" / name).read_bytes() for name in sorted(os.listdir(out_dir / "selected"))}


# ----- featurizer -----------------------------------------------------------------------
def test_normalisation_folds_width_case_and_whitespace():
    assert selection.normalize_text("ＡＢＣ　ｄｅｆ\n\n  ｶﾀｶﾅ\t") == "abc def カタカナ"


def test_char_ngrams_count_every_1_to_n_gram_within_each_document():
    counts = selection.char_ngram_counts(["日本語"], 3, 1 << 20)
    assert counts.sum() == 3 + 2 + 1  # 日 本 語, 日本 本語, 日本語
    together = selection.char_ngram_counts(["日本", "語です"], 3, 1 << 20)
    apart = selection.char_ngram_counts(["日本"], 3, 1 << 20) + selection.char_ngram_counts(["語です"], 3, 1 << 20)
    np.testing.assert_array_equal(together, apart)  # no n-gram spans two documents
    assert selection.char_ngram_counts([""], 3, 64).sum() == 0
    featurizer = selection.Featurizer()
    features, _, _ = featurizer.prepare(["日本語", "", "apt-get install", "あ"])
    assert featurizer.ngrams_per_text(features).tolist() == [6, 0, 9, 1]  # the fit budget's unit


def test_ascii_runs_are_words_and_japanese_is_characters():
    bucket = lambda text, latin=True: selection.char_ngram_counts([selection.normalize_text(text)], 3, 1 << 20, latin)  # noqa: E731
    assert bucket("apt-get install").sum() == 4 + 3 + 2  # apt - get install
    assert bucket("apt-get install", latin=False).sum() == 15 + 14 + 13  # every character, spaces too
    alone, inside = bucket("apt"), bucket("aptを使う")
    assert np.all(inside[alone > 0] >= 1)
    assert bucket("日本語").sum() == bucket("日本語", latin=False).sum() == 6


def test_char_ngrams_distinguish_japanese_clauses_the_default_featurizer_lumps():
    ours = selection.char_ngram_counts([selection.normalize_text("日本の首都は東京です")], 3, 1 << 16)
    default = get_ngram_counts("日本の首都は東京です", n=2, num_buckets=1 << 16)
    assert default.sum() == 1  # the package sees one "word"
    assert ours.sum() == 10 + 9 + 8


def test_hashes_are_the_same_in_another_process():
    code = ("import sys; sys.path.insert(0, 'scripts'); from toolkit import selection; "
            "print(selection.char_ngram_buckets(['データ選択 test'], 3, 1000)[0][0].tolist())")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    here = selection.char_ngram_buckets(["データ選択 test"], 3, 1000)[0][0].tolist()
    assert output == f"{here}\n" and len(set(here)) > 5


def test_batched_scores_equal_log_ratio_dot_per_document_features(ja_texts):
    featurizer = selection.Featurizer()
    log_diff = np.random.default_rng(0).normal(size=featurizer.num_buckets)
    texts = ja_texts[:40] + ["", "短い"]
    features, _, _ = featurizer.prepare(texts)
    per_document = [log_diff @ featurizer.featurize(text) for text in texts]
    np.testing.assert_allclose(featurizer.scores(features, log_diff), per_document, rtol=1e-9, atol=1e-6)


# ----- the stages: fit, filters, accounting -----------------------------------------------
def test_fit_and_score_use_the_same_features_and_smoothing(tmp_path):
    texts = ["東京は日本の首都です。" * 12, "ＦＵＬＬ　ｗｉｄｔｈ テキスト " * 10, "短い"]
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": t} for t in texts])
    target = write_jsonl(tmp_path / "target.jsonl", [{"text": "日本語の文書です。" * 5}])
    out, report = run(tmp_path, "--min_example_chars", "20", raw=[raw], target=[target], k=1)
    featurizer = selection.Featurizer()
    estimator = np.load(out / "cache" / report["keys"]["fit"] / "estimator.npz")
    kept = texts[:2]
    np.testing.assert_array_equal(estimator["raw_counts"], sum(featurizer.featurize(t) for t in kept))
    np.testing.assert_array_equal(estimator["target_counts"], featurizer.featurize("日本語の文書です。" * 5))
    # The package would have fitted other features (WordPunct words), which scoring never sees.
    assert not np.array_equal(sum(get_ngram_counts(t, n=3, num_buckets=65536) for t in kept), estimator["raw_counts"])
    # add-alpha: every log ratio finite, an unseen bucket at log(alpha / (T + alpha B)) - log p_raw
    log_diff, target_counts = estimator["log_diff"], estimator["target_counts"]
    unseen = target_counts == 0
    p_raw = selection.smoothed_probs(estimator["raw_counts"], 1.0)
    np.testing.assert_allclose(log_diff[unseen], np.log(1 / (target_counts.sum() + 65536)) - np.log(p_raw[unseen]))
    scores = np.load(out / "cache" / report["keys"]["fit"] / "scores" / "file_00000.part_0000_of_0001.npz")
    assert scores["status"].tolist() == [selection.CANDIDATE, selection.CANDIDATE, selection.TOO_SHORT]
    np.testing.assert_allclose(scores["weights"][:2], [log_diff @ featurizer.featurize(t) for t in kept], rtol=1e-9)


def test_length_filter_counts_characters_after_normalisation(tmp_path):
    records = [{"text": "あ" * 99 + "   \n\n  "}, {"text": "い" * 100, "id": 7}, {"text": "う" * 150}, {"text": "え  " * 60}]
    raw = write_jsonl(tmp_path / "raw.jsonl", records)
    out, report = run(tmp_path, "--min_example_chars", "100", raw=[raw], k=2)
    assert report["documents"] == {"read": 4, "filtered": {"too_short_chars": 1}, "filtered_total": 1,
                                   "candidates": 3, "selected": 2, "not_selected": 1}
    assert all(not json.loads(line)["text"].startswith("あ") for line in selected_lines(out))


def test_selection_keeps_original_lines_and_accounts_for_every_document(tmp_path, sample_data):
    out, report = run(tmp_path, k=300, tasks=2, workers=2)
    with gzip.open(sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz", "rt", encoding="utf-8") as f:
        raw_lines = f.read().splitlines()
    selected = selected_lines(out)
    assert len(selected) == 300 and set(selected) <= set(raw_lines)  # byte for byte, every field kept
    assert selected == [line for line in raw_lines if line in set(selected)]  # in pool order
    docs = report["documents"]
    assert docs["read"] == 1510 == docs["selected"] + docs["filtered_total"] + docs["not_selected"]
    assert (out / "log_importance_weights.png").read_bytes().startswith(b"\x89PNG")
    sources = [json.loads(line)["source"] for line in selected]
    pool_share = sum('"debian-reference-ja"' in line for line in raw_lines) / len(raw_lines)
    assert sources.count("debian-reference-ja") / len(sources) > 3 * pool_share


def test_the_fit_sees_every_file_when_the_budget_ends_inside_the_first(tmp_path):
    # A budget that the first (Japanese) file alone would exhaust: split across files, both are
    # fitted, and DSIR towards a Japanese target picks Japanese (it picked 238/300 English before).
    _, report = run(tmp_path, "--num_tokens_to_fit", "400000", raw=[POOL_JA, POOL_EN], k=300)
    fitted = {row["path"]: row for row in report["documents_per_file"]}
    assert all(row["documents_fitted"] > 0 and row["fit_stopped_at_budget"] for row in fitted.values())
    assert all(abs(row["ngrams_fitted"] - 200000) < 20000 for row in fitted.values())
    assert report["fit"]["ngrams"] == sum(row["ngrams_fitted"] for row in fitted.values())
    assert fitted[POOL_EN]["selected"] < 30


# ----- the same selection whatever runs it ---------------------------------------------------------
def test_same_selection_for_1_task_4_tasks_and_another_seed_differs(tmp_path, ja_texts):
    # Short documents, so that log weights are small and the Gumbel noise (the seed) matters.
    raw_a = write_jsonl(tmp_path / "a.jsonl", [{"text": t[:12], "id": i} for i, t in enumerate(ja_texts[:300])])
    raw_b = write_jsonl(tmp_path / "b.jsonl", [{"text": t[:12], "id": i} for i, t in enumerate(ja_texts[300:600])])
    common = ["--min_example_chars", "1", "--num_tokens_to_fit", "20000", "--seed", "3"]
    one, report_one = run(tmp_path, *common, raw=[raw_a, raw_b], k=100, out="one", tasks=1, workers=1)
    four, report_four = run(tmp_path, *common, raw=[raw_a, raw_b], k=100, out="four", tasks=4, workers=2)
    assert selected_bytes(one) == selected_bytes(four) and len(selected_lines(one)) == 100
    assert report_one["documents"] == report_four["documents"]
    assert report_one["documents_per_file"] == report_four["documents_per_file"]
    other, _ = run(tmp_path, *common[:-1], "4", raw=[raw_a, raw_b], k=100, out="one", tasks=1, workers=1)
    assert selected_lines(other) != selected_lines(four)
    # the scores were cached: the other seed only redrew (no new fit folder)
    assert len(os.listdir(one / "cache")) == 1 and len(os.listdir(one / "cache" / report_one["keys"]["fit"] / "draws")) == 2
    again, _ = run(tmp_path, *common, raw=[raw_a, raw_b], k=100, out="one", tasks=1, workers=1)  # back to seed 3
    assert selected_bytes(again) == selected_bytes(four)


def test_the_kth_key_is_found_across_sorted_arrays_without_loading_them():
    rng = np.random.default_rng(0)
    for _ in range(20):
        arrays = [np.sort(rng.choice(rng.normal(size=50), size=rng.integers(0, 40))) for _ in range(rng.integers(1, 5))]
        values = np.sort(np.concatenate(arrays))
        if len(values) == 0:
            continue
        for k in {1, len(values), int(rng.integers(1, len(values) + 1))}:
            assert selection.kth_smallest([a for a in arrays], k) == values[k - 1]


def test_ties_at_the_threshold_are_broken_by_file_and_line_whatever_the_task_count(tmp_path, ja_texts):
    # Web crawls hold duplicates: equal documents have equal weights, and --top_k has no noise.
    same = {"text": ja_texts[0]}
    raw_a = write_jsonl(tmp_path / "a.jsonl", [{"text": ja_texts[1]}, same, same, {"text": ja_texts[2]}, same])
    raw_b = write_jsonl(tmp_path / "b.jsonl", [same, same, {"text": ja_texts[3]}])
    target = write_jsonl(tmp_path / "t.jsonl", [same])  # the duplicated document scores highest
    outputs = []
    for tasks, workers in ((1, 1), (4, 2)):
        out, report = run(tmp_path, "--top_k", raw=[raw_a, raw_b], target=[target], k=4, out=f"t{tasks}",
                          tasks=tasks, workers=workers)
        outputs.append(selected_bytes(out))
        assert [row["selected"] for row in report["documents_per_file"]] == [3, 1]  # a:2, a:3, a:5, then b:1
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_ray_with_two_workers_selects_the_same_set(tmp_path):
    common = ["--num_tokens_to_fit", "400000"]
    local, _ = run(tmp_path, *common, raw=[POOL_JA, POOL_EN], k=200, out="local", tasks=1, workers=1)
    ray_out, report = run(tmp_path, *common, "--executor", "ray", raw=[POOL_JA, POOL_EN], k=200, out="ray", tasks=2,
                          workers=2)
    assert report["settings"]["executor"] == "ray"
    assert selected_bytes(ray_out) == selected_bytes(local)


@pytest.mark.parametrize("kill_after", ["count", "draw"])
def test_sigkill_then_the_same_command_gives_the_same_output(tmp_path, kill_after):
    command = [sys.executable, "scripts/select_data.py",
               *arguments(tmp_path, "--num_tokens_to_fit", "all", raw=[POOL_JA, POOL_EN], k=300, out="killed",
                          tasks=2, workers=2)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        markers = list((tmp_path / "killed").glob(f"cache/*/**/logs/**/{kill_after}/completions/*"))
        if markers:
            os.killpg(process.pid, signal.SIGKILL)  # the whole run: the main process and its workers
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "selection_report.json").exists()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clean, _ = run(tmp_path, "--num_tokens_to_fit", "all", raw=[POOL_JA, POOL_EN], k=300, out="clean", tasks=2, workers=2)
    assert selected_bytes(tmp_path / "killed") == selected_bytes(clean)
    assert json.loads((tmp_path / "killed" / "selection_report.json").read_text())["documents"] == \
        json.loads((clean / "selection_report.json").read_text())["documents"]


def test_default_featurizer_stays_selectable_with_its_word_filter(tmp_path, ja_texts):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": t} for t in ja_texts[:150]])
    _, report = run(tmp_path, "--featurizer", "dsir_default", raw=[raw], k=10)
    assert report["settings"]["featurizer"] == "dsir_default" and report["settings"]["num_buckets"] == 10000
    assert report["documents"]["filtered"]["too_few_words"] > 0


# ----- decontamination ----------------------------------------------------------------------------
def test_documents_sharing_a_13_gram_with_an_eval_item_are_dropped_before_the_fit(tmp_path, ja_texts):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": t} for t in ja_texts[:200]])
    # two tasks: one quotes 20 characters of document 5 (with other spacing), one quotes document 9 and 5 (18 units: "FTP" is one)
    task_a = write_jsonl(tmp_path / "jcqa.jsonl", [{"question": ja_texts[5][100:120].replace("", " ").strip(),
                                                     "choices": ["はい", "いいえ"], "label": 0}])
    task_b = tmp_path / "summaries.txt"
    task_b.write_text(ja_texts[9][50:80] + "\n無関係な文です。" + ja_texts[5][200:222], encoding="utf-8")
    out, report = run(tmp_path, "--decontaminate_against", task_a, task_b, raw=[raw], k=50, tasks=2, workers=2)
    assert report["documents"]["filtered"] == {"contaminated": 2}
    assert report["decontamination"]["documents_dropped_per_task"] == {"jcqa": 1, "summaries": 2}
    assert report["documents_per_file"][0]["documents_fitted"] == 198
    texts = {json.loads(line)["text"] for line in selected_lines(out)}
    assert ja_texts[5] not in texts and ja_texts[9] not in texts
    with pytest.raises(SystemExit, match="--decontamination_ngram"):
        run(tmp_path, "--decontaminate_against", task_a, "--decontamination_ngram", "0", raw=[raw], k=5, out="bad")


def test_an_lm_eval_task_name_decontaminates_against_the_documents_it_evaluates(tmp_path, ja_texts,
                                                                             lm_eval_task_yaml):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": t} for t in ja_texts[:120]])
    include = tmp_path / "lm_eval"
    include.mkdir()
    lm_eval_task_yaml(include, "quiz", [{"question": ja_texts[7][60:90], "answer": "はい"}, {"question": "短い", "answer": "x"}])
    out, report = run(tmp_path, "--decontaminate_against", "lm_eval:quiz", "--lm_eval_include_path", include,
                      raw=[raw], k=30)
    assert report["decontamination"]["documents_dropped_per_task"] == {"quiz": 1}
    assert ja_texts[7] not in {json.loads(line)["text"] for line in selected_lines(out)}
    items = (out / "decontamination" / "quiz.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(items) == 2 and ja_texts[7][60:90] in json.loads(items[0])["text"]


# ----- inputs: formats and the Hub -----------------------------------------------------------------
def test_zstd_and_parquet_inputs_select_the_same_documents(tmp_path, sample_data):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    with gzip.open(sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz", "rb") as stream:
        raw = stream.read()
    (tmp_path / "pool.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    records = [json.loads(line) for line in raw.splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pool.parquet", row_group_size=300)
    # --top_k: the Gumbel noise is keyed by the file's path, which differs here
    reference, _ = run(tmp_path, "--top_k", raw=[POOL_JA], k=100, out="gz")
    zstd, _ = run(tmp_path, "--top_k", raw=[tmp_path / "pool.jsonl.zst"], k=100, out="zst")
    parquet, report = run(tmp_path, "--top_k", raw=[tmp_path / "pool.parquet"], k=100, out="parquet", tasks=2, workers=2)
    assert selected_lines(zstd) == selected_lines(reference)
    # a parquet row is written as the JSON object of its columns
    assert [json.loads(line) for line in selected_lines(parquet)] == [json.loads(line) for line in selected_lines(reference)]
    assert report["documents"]["read"] == 1510
    with pytest.raises(CorpusError, match="unknown format"):
        data_engine.resolve_inputs([str(tmp_path / "report.json")]) if (tmp_path / "report.json").write_text("{}") else None


def test_hub_files_are_streamed_or_downloaded_with_download(tmp_path, monkeypatch, sample_data):
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(sample_data / "pool")  # a local folder with MADLAD-400's layout

    monkeypatch.setattr(data_engine, "snapshot_download", fake_snapshot_download)
    _, report = run(tmp_path, "--download", raw=["hf://datasets/allenai/MADLAD-400/data/ja/ja_clean_000*.jsonl.gz"], k=20)
    assert calls == [{"repo_id": "allenai/MADLAD-400", "repo_type": "dataset",
                      "allow_patterns": ["data/ja/ja_clean_000*.jsonl.gz"], "revision": None, "cache_dir": None}]
    assert [f["path"] for f in report["inputs"]["raw_datasets"]] == [str(sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz")]
    with pytest.raises(CorpusError, match="nothing downloaded matches"):
        data_engine.resolve_inputs(["hf://datasets/allenai/MADLAD-400/data/xx/xx_clean_0000.jsonl.gz"], download=True)
    # without --download, any fsspec URL is streamed in place (here the local file:// protocol)
    paths = data_engine.resolve_inputs([f"file://{sample_data}/pool/data/*/*_clean_0000.jsonl.gz"])
    assert paths == [f"file://{sample_data}/pool/data/en/en_clean_0000.jsonl.gz",
                     f"file://{sample_data}/pool/data/ja/ja_clean_0000.jsonl.gz"]
    assert sum(1 for _ in data_engine.iter_raw_lines(paths[1])) == 1510


# ----- bad input --------------------------------------------------------------------------------
BAD_LINES = {
    "malformed_json": b'{"text": "\xe3\x81\x82" ',
    "missing_text": b'{"body": "no text here"}',
    "text_not_string": b'{"text": 42}',
    "invalid_utf8": b'{"text": "\xff\xfe bad bytes"}',
    "lone_surrogate": b'{"text": "\\ud800 half of a pair"}',
    "blank_line": b"   ",
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_is_an_error_naming_file_and_line_or_a_counted_skip(tmp_path, reason):
    good = json.dumps({"text": "正しい文書です。" * 20}, ensure_ascii=False).encode()
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(good + b"\n" + BAD_LINES[reason] + b"\n" + good + b"\n")
    with pytest.raises(CorpusError, match=f"{raw}:2: "):
        run(tmp_path, raw=[raw], k=1)
    out, report = run(tmp_path, "--skip_bad_records", raw=[raw], k=1, out="skip")
    assert report["documents"]["filtered"] == {reason: 1}
    assert report["documents"]["read"] == 3 == 1 + 1 + report["documents"]["not_selected"]
    # what was selected is valid UTF-8 JSON that the next stage can read
    assert all(json.loads(line)["text"].encode("utf-8") for line in selected_lines(out))


def test_a_cache_written_under_skip_bad_records_is_not_reused_by_a_strict_run(tmp_path):
    good = json.dumps({"text": "正しい文書です。" * 20}, ensure_ascii=False)
    raw = write_jsonl(tmp_path / "raw.jsonl", [good, '{"text": 1}', good])
    run(tmp_path, "--skip_bad_records", raw=[raw], k=1)
    with pytest.raises(CorpusError, match=":2: 'text' is int"):
        run(tmp_path, raw=[raw], k=1)


def test_a_file_of_blank_lines_is_a_clear_error_even_when_skipping(tmp_path):
    raw = tmp_path / "blank.jsonl"
    raw.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no raw document passed the filters"):
        run(tmp_path, "--skip_bad_records", raw=[raw], k=1)


@pytest.mark.parametrize("k", ["0", "-1"])
def test_num_to_sample_below_one_is_refused_before_any_work(tmp_path, k):
    with pytest.raises(SystemExit, match="--num_to_sample must be at least 1"):
        select_data.main(arguments(tmp_path, k=k))
    assert not (tmp_path / "out").exists()


def test_asking_for_more_than_the_candidates_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="more than the 1510 documents"):
        run(tmp_path, k=2000)


def test_a_damaged_cache_file_is_rebuilt_by_the_next_run(tmp_path):
    out, report = run(tmp_path, k=10, tasks=2, workers=2, raw=[POOL_JA, POOL_EN])
    first = selected_bytes(out)
    scores = out / "cache" / report["keys"]["fit"] / "scores" / "file_00001.part_0000_of_0001.npz"
    scores.write_bytes(scores.read_bytes()[:100])  # cut short by a disk problem
    with pytest.raises(CorpusError, match="file_00001.part_0000_of_0001.npz: damaged cache file .*run the same command again"):
        run(tmp_path, "--seed", "5", k=10, tasks=2, workers=2, raw=[POOL_JA, POOL_EN])
    _, again = run(tmp_path, "--seed", "5", k=10, tasks=2, workers=2, raw=[POOL_JA, POOL_EN])  # rebuilds task 1's scores
    assert again["documents"]["read"] == 3381 and np.load(scores)["status"].shape == (1871,)
    run(tmp_path, k=10, tasks=2, workers=2, raw=[POOL_JA, POOL_EN])  # back to seed 0
    assert selected_bytes(out) == first


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wb"):
        pass
    with pytest.raises(CorpusError, match="empty"):
        run(tmp_path, raw=[empty], k=1)
    with pytest.raises(CorpusError, match="no file matches"):
        run(tmp_path, raw=[tmp_path / "nothing_*.jsonl"], k=1)


def test_command_line_reports_bad_input_in_one_line(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"text": 5}\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "scripts/select_data.py", *arguments(tmp_path, raw=[raw], k=1, workers=2,
                                                                                 tasks=2)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{raw}:1: 'text' is int, not a string" in result.stderr and "Traceback" not in result.stderr


# ----- issue 20: inputs and caches at MADLAD scale ----------------------------------------------
def test_the_selection_does_not_depend_on_how_a_path_is_spelled(tmp_path, monkeypatch, ja_texts):
    # Short documents: small weights, so the Gumbel noise (keyed by the file) decides many draws.
    (tmp_path / "data").mkdir()
    raw = write_jsonl(tmp_path / "data" / "raw.jsonl", [{"text": t[:12], "id": i} for i, t in enumerate(ja_texts[:600])])
    (tmp_path / "mount").symlink_to(tmp_path / "data")  # the same dataset mounted elsewhere
    common = ["--min_example_chars", "1", "--num_tokens_to_fit", "all"]
    monkeypatch.chdir(tmp_path)
    outputs = []
    for name, spelling in (("plain", raw), ("dotted", "./data/raw.jsonl"), ("mounted", "mount/../mount/raw.jsonl")):
        out, report = run(tmp_path, *common, raw=[spelling], target=[os.path.abspath(os.path.join(ROOT, TARGET))], k=200,
                          out=name, tasks=2, workers=2)
        outputs.append(selected_bytes(out))
    assert outputs[0] == outputs[1] == outputs[2]


def test_a_file_given_twice_is_read_once_with_a_warning_and_a_count(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.getcwd())
    once, report_once = run(tmp_path, raw=[POOL_JA], k=100, out="once")
    twice, report = run(tmp_path, raw=[POOL_JA, f"./{POOL_JA}", os.path.abspath(POOL_JA)], k=100, out="twice")
    assert "warning: 2 raw files given more than once (read once)" in capsys.readouterr().err
    assert report["inputs"]["duplicates_ignored"] == {"raw_datasets": 2, "target_datasets": 0}
    assert report["documents"] == report_once["documents"] and selected_bytes(twice) == selected_bytes(once)
    assert len(set(selected_lines(twice))) == 100


def test_a_rerun_with_fewer_workers_recomputes_nothing(tmp_path, monkeypatch):
    common = ["--num_tokens_to_fit", "all"]
    two, report = run(tmp_path, *common, raw=[POOL_JA], k=100, out="out", tasks=2, workers=2)
    first = selected_bytes(two)

    def recomputed(*args, **kwargs):
        raise AssertionError("counted or scored again")

    monkeypatch.setattr(selection.Featurizer, "counts", recomputed)
    monkeypatch.setattr(selection.Featurizer, "scores", recomputed)
    one, again = run(tmp_path, *common, raw=[POOL_JA], k=100, out="out", tasks=1, workers=1)  # e.g. after an OOM
    assert selected_bytes(one) == first and again["keys"]["fit"] == report["keys"]["fit"]
    assert again["documents"] == report["documents"]


def test_crlf_lines_are_kept_byte_for_byte(tmp_path, ja_texts):
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() + (b"\r\n" if i % 2 else b"\n")
             for i, t in enumerate(ja_texts[:50])]
    raw = tmp_path / "crlf.jsonl"
    raw.write_bytes(b"".join(lines))
    out, _ = run(tmp_path, raw=[raw], k=50)
    with gzip.open(out / "selected" / "00000.jsonl.gz", "rb") as stream:
        assert stream.read() == b"".join(lines)


def test_a_killed_writer_s_temporary_is_removed_and_never_read(tmp_path):
    out, _ = run(tmp_path, raw=[POOL_JA], k=40)
    leftover = out / "selected" / ".tmp.4242.00000.jsonl.gz"
    leftover.write_bytes(b"\x1f\x8b\x08 cut short by SIGKILL")
    run(tmp_path, "--seed", "1", raw=[POOL_JA], k=40)
    assert not leftover.exists()
    # the next stage's glob over the selection sees final shards only
    assert data_engine.resolve_inputs([f"file://{out}/selected/*.jsonl.gz"]) == [f"file://{out}/selected/00000.jsonl.gz"]


def test_an_output_inside_the_inputs_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").mkdir()
    inside = write_jsonl(tmp_path / "out" / "raw.jsonl", [{"text": "x" * 200}])
    with pytest.raises(SystemExit, match="raw.jsonl is inside --output_dir"):
        run(tmp_path, raw=[inside], k=1)
    assert os.listdir(tmp_path / "out") == ["raw.jsonl"]
