"""scripts/select_data.py and toolkit/selection.py on tiny real inputs (the bundled Debian corpus)."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from data_selection.hashed_ngram_dsir import get_ngram_counts

import select_data
from toolkit import selection
from toolkit.corpus import CorpusError, read_texts

POOL_JA = "sample_data/pool/data/ja/ja_clean_0000.jsonl.gz"
POOL_EN = "sample_data/pool/data/en/en_clean_0000.jsonl.gz"
TARGET = "sample_data/target/ja_target.jsonl.gz"


@pytest.fixture(scope="module")
def ja_texts(sample_data):
    texts, _ = read_texts([sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz"])
    return texts


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


def run(tmp_path, *extra, raw=(POOL_JA,), target=(TARGET,), k=40, out="out", proc=1):
    out_dir = tmp_path / out
    raw_args = ["--raw_datasets", *map(str, raw)] if raw else []
    select_data.main([*raw_args, "--target_datasets", *map(str, target),
                      "--num_to_sample", str(k), "--output_dir", str(out_dir), "--num_proc", str(proc),
                      "--no_progress", *extra])
    report = json.loads((out_dir / "selection_report.json").read_text())
    return out_dir, report


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


def test_ascii_runs_are_words_and_japanese_is_characters():
    bucket = lambda text, latin=True: selection.char_ngram_counts([selection.normalize_text(text)], 3, 1 << 20, latin)  # noqa: E731
    assert bucket("apt-get install").sum() == 4 + 3 + 2  # apt - get install
    assert bucket("apt-get install", latin=False).sum() == 15 + 14 + 13  # every character, spaces too
    # the word "apt" is the same unit whether it stands alone or sits inside Japanese
    alone, inside = bucket("apt"), bucket("aptを使う")
    assert np.all(inside[alone > 0] >= 1)
    assert bucket("日本語").sum() == bucket("日本語", latin=False).sum() == 6


def test_char_ngrams_distinguish_japanese_clauses_the_default_featurizer_lumps(ja_texts):
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


def test_batched_scores_equal_log_ratio_dot_per_document_features(tmp_path, ja_texts):
    dsir = selection.JapaneseDSIR([POOL_JA], [TARGET], cache_dir=tmp_path, num_proc=1, show_progress=False)
    dsir.fit_importance_estimator()
    texts = ja_texts[:40] + ["", "短い"]
    per_document = [dsir.importance_estimator(dsir.featurizer(text)) for text in texts]
    np.testing.assert_allclose(dsir.score_batch(texts), per_document, rtol=1e-9, atol=1e-6)


def test_fit_and_score_use_the_same_features(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": t} for t in
                                                ["東京は日本の首都です。" * 12, "ＦＵＬＬ　ｗｉｄｔｈ テキスト " * 10, "短い"]])
    target = write_jsonl(tmp_path / "target.jsonl", [{"text": "日本語の文書です。" * 5}])
    dsir = selection.JapaneseDSIR([raw], [target], cache_dir=tmp_path / "c", num_proc=1, min_example_chars=20,
                                  show_progress=False)
    dsir.fit_importance_estimator()
    texts, _ = read_texts([raw])
    kept = [t for t in texts if len(selection.normalize_text(t)) >= 20]
    np.testing.assert_array_equal(dsir.raw_counts, sum(dsir.featurizer(t) for t in kept))
    np.testing.assert_array_equal(dsir.target_counts, dsir.featurizer("日本語の文書です。" * 5))
    # The package would have fitted other features (WordPunct words), which scoring never sees.
    package = sum(get_ngram_counts(t, n=3, num_buckets=dsir.num_buckets) for t in kept)
    assert not np.array_equal(package, dsir.raw_counts)
    dsir.compute_importance_weights()
    weights, status, _ = dsir.load_weights()
    scored = status == selection.CANDIDATE
    np.testing.assert_allclose(weights[scored], [dsir.log_diff @ dsir.featurizer(t) for t in kept], rtol=1e-9)
    assert list(status) == [selection.CANDIDATE, selection.CANDIDATE, selection.TOO_SHORT]


def test_smoothing_keeps_buckets_the_target_never_saw_finite(tmp_path):
    dsir = selection.JapaneseDSIR([POOL_JA], [TARGET], cache_dir=tmp_path, num_proc=1, show_progress=False)
    dsir.fit_importance_estimator()
    unseen = dsir.target_counts == 0
    assert unseen.any() and np.isfinite(dsir.log_diff).all()
    # add-alpha: an unseen bucket scores log(alpha / (T + alpha B)) - log p_raw, far above log(1e-8)
    alpha, buckets = dsir.smoothing_alpha, dsir.num_buckets
    expected = np.log(alpha / (dsir.target_counts.sum() + alpha * buckets)) - np.log(dsir.raw_probs[unseen])
    np.testing.assert_allclose(dsir.log_diff[unseen], expected)
    assert dsir.log_diff[unseen].min() > np.log(1e-8) - np.log(dsir.raw_probs[unseen]).max()
    with pytest.raises(ValueError, match="smoothing_alpha"):
        selection.JapaneseDSIR([POOL_JA], [TARGET], cache_dir=tmp_path, smoothing_alpha=0)


# ----- the CLI: filter, accounting, determinism, resume -----------------------------------
def test_length_filter_counts_characters_after_normalisation(tmp_path):
    records = [{"text": "あ" * 99 + "   \n\n  "}, {"text": "い" * 100, "id": 7}, {"text": "う" * 150}, {"text": "え  " * 60}]
    raw = write_jsonl(tmp_path / "raw.jsonl", records)
    out, report = run(tmp_path, "--min_example_chars", "100", raw=[raw], k=2)
    docs = report["documents"]
    assert docs == {"read": 4, "filtered": {"too_short_chars": 1}, "filtered_total": 1, "candidates": 3,
                    "selected": 2, "not_selected": 1}
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert all(not r["text"].startswith("あ") for r in selected)


def test_selection_keeps_original_lines_and_accounts_for_every_document(tmp_path, sample_data):
    out, report = run(tmp_path, k=300, proc=2)
    with gzip.open(sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz", "rt", encoding="utf-8") as f:
        raw_lines = set(f.read().splitlines())
    selected = (out / "selected.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(selected) == 300 and set(selected) <= raw_lines  # byte for byte, every field kept
    docs = report["documents"]
    assert docs["read"] == 1510 == docs["selected"] + docs["filtered_total"] + docs["not_selected"]
    assert (out / "log_importance_weights.png").read_bytes().startswith(b"\x89PNG")
    # DSIR towards the Debian Reference picks it far more often than its share of the pool
    sources = [json.loads(line)["source"] for line in selected]
    pool_share = sum('"debian-reference-ja"' in line for line in raw_lines) / len(raw_lines)
    assert sources.count("debian-reference-ja") / len(sources) > 3 * pool_share


def test_same_seed_same_output_across_process_counts_and_resume(tmp_path, ja_texts):
    # Short documents, so that log weights are small and the Gumbel noise (the seed) matters;
    # on long documents DSIR's summed log ratios make the sampling close to a top-k.
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": t[:12], "id": i} for i, t in enumerate(ja_texts[:600])])
    common = ["--min_example_chars", "1", "--batch_size", "64"]
    out1, report1 = run(tmp_path, "--seed", "3", *common, raw=[raw], k=100, out="a", proc=1)
    out2, report2 = run(tmp_path, "--seed", "3", *common, raw=[raw], k=100, out="b", proc=2)
    assert (out1 / "selected.jsonl").read_bytes() == (out2 / "selected.jsonl").read_bytes()
    out3, _ = run(tmp_path, "--seed", "4", *common, raw=[raw], k=100, out="a", proc=1)
    assert (out3 / "selected.jsonl").read_bytes() != (out2 / "selected.jsonl").read_bytes()
    assert report1["resumed"] == {"estimator": False, "weights_files_reused": 0}
    again, report = run(tmp_path, "--seed", "3", *common, raw=[raw], k=100, out="a", proc=1)  # cache of run "a"
    assert report["resumed"] == {"estimator": True, "weights_files_reused": 1}
    assert (again / "selected.jsonl").read_bytes() == (out2 / "selected.jsonl").read_bytes()


def test_default_featurizer_stays_selectable_with_its_word_filter(tmp_path, ja_texts):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"text": t} for t in ja_texts[:150]])
    _, report = run(tmp_path, "--featurizer", "dsir_default", raw=[raw], k=10)
    assert report["settings"]["featurizer"] == "dsir_default" and report["settings"]["num_buckets"] == 10000
    # the package's 100-"word" filter drops Japanese documents that are hundreds of characters long
    assert report["documents"]["filtered"]["too_few_words"] > 0


def test_asking_for_more_than_the_candidates_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="more than the 1510 documents"):
        run(tmp_path, k=2000)


# ----- bad input ------------------------------------------------------------------------------
BAD_LINES = {
    "malformed_json": b'{"text": "\xe3\x81\x82" ',
    "missing_text": b'{"body": "no text here"}',
    "text_not_string": b'{"text": 42}',
    "invalid_utf8": b'{"text": "\xff\xfe bad bytes"}',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_is_an_error_naming_file_and_line_or_a_counted_skip(tmp_path, reason):
    good = json.dumps({"text": "正しい文書です。" * 20}, ensure_ascii=False).encode()
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(good + b"\n" + BAD_LINES[reason] + b"\n" + good + b"\n")
    with pytest.raises(CorpusError, match=f"{raw}:2: "):
        run(tmp_path, raw=[raw], k=1)
    _, report = run(tmp_path, "--skip_bad_records", raw=[raw], k=1, out="skip")
    assert report["documents"]["filtered"] == {reason: 1}
    assert report["documents"]["read"] == 3 == 1 + 1 + report["documents"]["not_selected"]


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wb"):
        pass
    with pytest.raises(CorpusError, match="empty"):
        run(tmp_path, raw=[empty], k=1)
    with pytest.raises(CorpusError, match="no file matches"):
        run(tmp_path, raw=[tmp_path / "nothing_*.jsonl"], k=1)


# ----- Hub inputs, offline against a folder with MADLAD-400's layout ----------------------------
def test_hub_dataset_downloads_only_the_named_files(tmp_path, monkeypatch, sample_data):
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(sample_data / "pool")  # a local folder with the layout data/<lang>/<lang>_clean_NNNN.jsonl.gz

    monkeypatch.setattr(selection, "snapshot_download", fake_snapshot_download)
    _, report = run(tmp_path, "--hub_dataset", "allenai/MADLAD-400", "--hub_files", "data/ja/ja_clean_000*.jsonl.gz",
                    raw=[], k=20)
    assert calls == [{"repo_id": "allenai/MADLAD-400", "repo_type": "dataset",
                      "allow_patterns": ["data/ja/ja_clean_000*.jsonl.gz"], "revision": None, "cache_dir": None}]
    assert [f["path"] for f in report["inputs"]["raw_datasets"]] == [str(sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz")]
    assert report["documents"]["read"] == 1510

    calls.clear()
    paths = selection.resolve_inputs(["hf://datasets/allenai/MADLAD-400/data/en/en_clean_0000.jsonl.gz", TARGET])
    assert calls[0]["allow_patterns"] == ["data/en/en_clean_0000.jsonl.gz"]
    assert paths == [TARGET, str(sample_data / "pool/data/en/en_clean_0000.jsonl.gz")]
    with pytest.raises(CorpusError, match="nothing downloaded matches"):
        selection.resolve_inputs(["hf://datasets/allenai/MADLAD-400/data/xx/xx_clean_0000.jsonl.gz"])


def test_command_line_reports_bad_input_in_one_line(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"text": 5}\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "scripts/select_data.py", "--raw_datasets", str(raw), "--target_datasets",
                             TARGET, "--num_to_sample", "1", "--output_dir", str(tmp_path / "out"), "--no_progress"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{raw}:1: 'text' is int, not a string" in result.stderr and "Traceback" not in result.stderr
