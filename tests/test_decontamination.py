import gzip
import json

import pytest

from toolkit.corpus import CorpusError
from toolkit.decontamination import EvalNgramIndex, ngram_hashes, normalize_for_overlap

ITEM = "次の節の見出しを一行で答えてください。タイルキャッシュの設定方法"


def test_shared_13gram_is_found_across_width_case_and_spacing():
    index = EvalNgramIndex(13)
    index.add("heading", [ITEM])
    # full-width letters, extra spaces and a line break inside the copied span
    web_page = "ブログ記事: 次の節の見出しを 一行で\n答えてください。 ＡＢＣ"
    assert index.overlapping_tasks([web_page]) == [["heading"]]


def test_twelve_shared_characters_are_not_contamination():
    index = EvalNgramIndex(13)
    index.add("heading", [ITEM])
    shared = normalize_for_overlap(ITEM)[:12]
    assert index.overlapping_tasks([f"無関係な文章{shared}全く別の話"]) == [[]]


def test_ngrams_never_span_two_texts():
    # the end of one text and the start of the next would form the item's 13-gram
    item = "あいうえおかきくけこさしす"
    index = EvalNgramIndex(13)
    index.add("t", [item])
    assert index.overlapping_tasks(["xxあいうえおか", "きくけこさしすxx", item]) == [[], [], ["t"]]
    hashes, owners = ngram_hashes(["abc", "", "abcd"], 3)
    assert owners.tolist() == [0, 2, 2]
    assert hashes[0] == hashes[1]  # the same n-gram hashes the same wherever it stands


def test_tasks_are_told_apart_and_counted(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "heading_mc.jsonl").write_text(
        json.dumps({"id": "x-1", "prompt": ITEM, "choices": ["一", "二"], "label": 0}, ensure_ascii=False) + "\n\n")
    with gzip.open(tasks / "other.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "全然ちがう評価用の文章がここに入ります"}]},
                                ensure_ascii=False) + "\n")
    (tasks / "notes.txt").write_text("タイルキャッシュの設定方法について説明します", encoding="utf-8")
    index = EvalNgramIndex.from_files([str(tasks / "*")], n=13)
    assert index.items == {"heading_mc": 1, "notes": 1, "other": 1}
    found = index.overlapping_tasks([
        "前置き" + ITEM[-16:],                 # the tail of the item: heading_mc and the notes share it
        "全然ちがう評価用の文章がここに入ります",  # from a chat turn
        "関係のない文書",
    ])
    assert found == [["heading_mc", "notes"], ["other"], []]


def test_bad_eval_file_names_file_and_line(tmp_path):
    bad = tmp_path / "task.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"task\.jsonl:2"):
        EvalNgramIndex.from_files([str(bad)])
    with pytest.raises(CorpusError, match="no file matches"):
        EvalNgramIndex.from_files([str(tmp_path / "missing*.jsonl")])
    with pytest.raises(ValueError, match=">= 1"):
        EvalNgramIndex(0)


def test_an_english_word_is_one_unit_so_thirteen_shared_letters_are_not_a_copy():
    """13 units: 13 Japanese characters, or 13 English words (not 13 letters of one word)."""
    index = EvalNgramIndex(13)
    index.add("manual", ["設定ファイルの documentation を読んでください。/usr/share/doc/debian を見ること。"])
    assert index.overlapping_tasks(["This documentation explains the configuration."]) == [[]]
    sentence = "the quick brown fox jumps over the lazy dog while the cat sleeps on the mat"
    index.add("english", [f"Q: {sentence}?"])
    copied = f"A blog post: THE  quick brown fox jumps over\nthe lazy dog while the cat sleeps on it."
    assert index.overlapping_tasks([copied, " ".join(sentence.split()[:12]) + " today"]) == [["english"], []]
    # width and case do not matter, and a word is one unit
    assert normalize_for_overlap("ABC def") == normalize_for_overlap("ａｂｃ  DEF") and len(normalize_for_overlap("ABC def")) == 2
