import json
import re

from datasets import load_dataset

from build_sample_corpus import html_documents, split_long
from toolkit.text import japanese_char_ratio

SPLITS = {
    "pool/data/ja/ja_clean_0000.jsonl.gz": "ja",
    "pool/data/en/en_clean_0000.jsonl.gz": "en",
    "target/ja_target.jsonl.gz": "ja",
    "eval/ja_eval.jsonl.gz": "ja",
    "eval/en_eval.jsonl.gz": "en",
}


def load(sample_data, relative):
    return load_dataset("json", data_files=str(sample_data / relative), split="train")


def test_every_split_loads_with_datasets_and_is_in_its_language(sample_data):
    for relative, lang in SPLITS.items():
        dataset = load(sample_data, relative)
        assert "text" in dataset.column_names and len(dataset) >= 100
        assert set(dataset["lang"]) == {lang}
        ratios = [japanese_char_ratio(text) for text in dataset["text"]]
        assert min(ratios) >= 0.25 if lang == "ja" else max(ratios) == 0.0


def test_splits_are_disjoint_and_the_target_is_one_source(sample_data):
    texts = {relative: set(load(sample_data, relative)["text"]) for relative in SPLITS}
    relatives = list(texts)
    for i, first in enumerate(relatives):
        for second in relatives[i + 1:]:
            assert not texts[first] & texts[second], (first, second)
    assert set(load(sample_data, "target/ja_target.jsonl.gz")["source"]) == {"debian-reference-ja"}
    pool_sources = set(load(sample_data, "pool/data/ja/ja_clean_0000.jsonl.gz")["source"])
    assert "debian-reference-ja" in pool_sources and len(pool_sources) >= 5


def test_readme_counts_match_the_files(sample_data):
    readme = (sample_data / "README.md").read_text()
    manifest = json.loads((sample_data / "manifest.json").read_text())
    for relative in SPLITS:
        dataset = load(sample_data, relative)
        row = re.search(rf"^\| `{re.escape(relative)}` \| ([\d,]+) \| ([\d,]+) \|", readme, re.M)
        assert row, relative
        documents, characters = (int(value.replace(",", "")) for value in row.groups())
        assert documents == len(dataset) == manifest["files"][relative]["documents"]
        assert characters == sum(map(len, dataset["text"])) == manifest["files"][relative]["characters"]


def test_html_sections_and_long_document_cuts(tmp_path):
    page = tmp_path / "page.html"
    page.write_text(
        "<html><head><title>skip</title><style>p{}</style></head><body>"
        "<h2>1. 見出し</h2><p>最初の 段落。</p><pre>code  keeps\n  spacing</pre>"
        "<h2>2. Second</h2><p>Another&nbsp;section.</p><script>var x;</script></body></html>",
        encoding="utf-8",
    )
    sections = [s for s in html_documents(page) if s]
    assert sections == ["1. 見出し\n\n最初の 段落。\n\ncode  keeps\n  spacing", "2. Second\n\nAnother section."]  # nbsp folds to a space
    pieces = split_long("\n\n".join(["あ" * 400] * 5), max_chars=1000)
    assert [len(p) for p in pieces] == [802, 802, 400]
