import gzip
import json
import re
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import extend_tokenizer
from toolkit.corpus import CorpusError, read_texts
from toolkit.reports import read_json
from toolkit.text import contains_japanese
from toolkit.tokenizer_extension import (
    ADVERSARIAL_TEXTS,
    BYTE_LEVEL,
    JAPANESE_WORD_CHARACTERS,
    SENTENCEPIECE,
    ExtensionError,
    byte_level_symbols,
    contains_japanese_script,
    merge_into_base,
    round_trip_failures,
    standalone_tokenizer,
    tokenizer_family,
    train_bpe,
)

EXTRA_ROUND_TRIP = [
    "鬱蘊齉龘𪚲𠀋𡈽",  # rare kanji, some outside the BMP
    "ﾊﾝｶｸ ｶﾀｶﾅ と ＺＥＮＫＡＫＵ ｅｉｓｕｕ ＃＄％",
    "\x00\x04\x08\x0b\x0c\x0e\x1f\x7f\x80\x9f",
    "\n" * 50 + " " * 300 + "\t" * 30 + "\u3000" * 20,
    "🇯🇵🏳️‍🌈👍🏽 emoji and 日本語 and ascii",
    "混在 mixed テキスト text 1234５６７８ 文字",
]


def write_jsonl(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        for text in texts:
            stream.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def run_extension(monkeypatch, *arguments):
    monkeypatch.setattr(sys, "argv", ["extend_tokenizer.py", *map(str, arguments)])
    extend_tokenizer.main()


@pytest.fixture(scope="module")
def japanese_train_file(sample_data, tmp_path_factory):
    """About 300 KB of Japanese from the pool (not the eval split)."""
    texts, _ = read_texts([sample_data / "pool" / "data" / "ja" / "ja_clean_0000.jsonl.gz"])
    chosen, size = [], 0
    for text in texts:
        chosen.append(text)
        size += len(text)
        if size > 150_000:
            break
    return write_jsonl(tmp_path_factory.mktemp("train") / "ja_train.jsonl.gz", chosen)


@pytest.fixture(scope="module")
def eval_texts(sample_data):
    ja, _ = read_texts([sample_data / "eval" / "ja_eval.jsonl.gz"])
    en, _ = read_texts([sample_data / "eval" / "en_eval.jsonl.gz"])
    return ja, en


def _extend(base, train_file, sample_data, output_dir, vocab_size):
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_extension(monkeypatch, "--base_tokenizer", base, "--train_files", train_file,
                      "--eval_files", sample_data / "eval" / "ja_eval.jsonl.gz",
                      sample_data / "eval" / "en_eval.jsonl.gz",
                      "--vocab_size", vocab_size, "--output_dir", output_dir)
    return output_dir


@pytest.fixture(scope="module")
def extended(japanese_train_file, sample_data, tmp_path_factory, mistral_tokenizer_path, smollm2_path):
    """Both families, extended by about 1k tokens: (base path, extended path, family)."""
    cases = {
        "mistral": (mistral_tokenizer_path, "offline:mistral-7b-tokenizer", 33000, SENTENCEPIECE),
        "smollm2": (smollm2_path, "offline:smollm2-135m", 50176, BYTE_LEVEL),
    }
    results = {}
    for name, (path, base, vocab_size, family) in cases.items():
        output = _extend(base, japanese_train_file, sample_data, tmp_path_factory.mktemp(name), vocab_size)
        results[name] = (path, output, family)
    return results


FAMILIES = ["mistral", "smollm2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_base_ids_merges_and_special_tokens_are_preserved(extended, name):
    base_path, output, _ = extended[name]
    base_json = json.loads((Path(base_path) / "tokenizer.json").read_text(encoding="utf-8"))
    new_json = json.loads((output / "tokenizer.json").read_text(encoding="utf-8"))
    base_vocab, new_vocab = base_json["model"]["vocab"], new_json["model"]["vocab"]
    assert all(new_vocab[token] == index for token, index in base_vocab.items())
    new_ids = sorted(index for token, index in new_vocab.items() if token not in base_vocab)
    assert new_ids == list(range(len(base_vocab), len(base_vocab) + len(new_ids)))
    base_merges, new_merges = base_json["model"]["merges"], new_json["model"]["merges"]
    assert new_merges[:len(base_merges)] == base_merges
    # one merge per new token at most: no "every split of every token"
    assert 0 < len(new_merges) - len(base_merges) <= len(new_ids)
    assert new_json["added_tokens"] == base_json["added_tokens"]
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert new_json[part] == base_json[part], part

    base, tokenizer = AutoTokenizer.from_pretrained(base_path), AutoTokenizer.from_pretrained(output)
    for attribute in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(tokenizer, attribute) == getattr(base, attribute), attribute
    assert tokenizer.get_vocab() | base.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("name", FAMILIES)
def test_report_and_requested_size_rounded_to_multiple_of_64(extended, name):
    base_path, output, _ = extended[name]
    report = read_json(output / "tokenizer_report.json")
    tokenizer = AutoTokenizer.from_pretrained(output)
    base_size = len(AutoTokenizer.from_pretrained(base_path))
    assert report["base_vocab_size"] == base_size
    assert report["final_vocab_size"] == len(tokenizer) == report["target_vocab_size"]
    assert len(tokenizer) % 64 == 0 and len(tokenizer) >= report["requested_vocab_size"] > len(tokenizer) - 64
    assert report["tokens_added"] == len(tokenizer) - base_size
    assert report["shortfall"] is None
    assert report["round_trip"]["lossless"] is True and report["problems"] == []
    assert report["encoding_throughput_mb_per_s"]["extended"] > 0
    sentencepiece_model = report["sentencepiece_model"]
    if name == "mistral":  # a SentencePiece base: tokenizer.model written and agreeing on every checked text
        assert sentencepiece_model["written"] and sentencepiece_model["ids_differ"] == 0
        assert sentencepiece_model["pieces"] == len(tokenizer) and (output / "tokenizer.model").is_file()
    else:  # byte-level: llama.cpp converts tokenizer.json itself
        assert not sentencepiece_model["written"] and "byte_level" in sentencepiece_model["reason"]
        assert not (output / "tokenizer.model").exists()
    assert not list(output.glob(".tokenizer-*"))  # the staging folder is gone
    assert report["training_seconds"] > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_on_adversarial_text(extended, name, eval_texts, japanese_train_file):
    _, output, _ = extended[name]
    tokenizer = AutoTokenizer.from_pretrained(output)
    train_text = "".join(read_texts([japanese_train_file])[0])
    assert not any(character in train_text for character in "鬱齉龘𪚲𠀋𡈽😀🇯")  # really unseen in training
    texts = ADVERSARIAL_TEXTS + EXTRA_ROUND_TRIP + eval_texts[0][:20] + eval_texts[1][:20]
    for text in texts:  # as data is tokenised: "<s>" in a text is text
        ids = tokenizer(text, split_special_tokens=True)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text, repr(text[:60])
    assert round_trip_failures(tokenizer, texts) == []


def test_byte_level_extension_adds_the_bytes_the_base_cannot_represent(extended):
    base_path, output, _ = extended["smollm2"]
    base, tokenizer = AutoTokenizer.from_pretrained(base_path), AutoTokenizer.from_pretrained(output)
    text = "end of transmission \x04 and byte 0xF5-only planes \U00050000"
    assert round_trip_failures(base, [text])  # the GGUF vocabulary lacks some byte symbols
    assert round_trip_failures(tokenizer, [text]) == []


@pytest.mark.parametrize("name", FAMILIES)
def test_japanese_improves_and_english_is_segmented_exactly_as_before(extended, name, eval_texts):
    base_path, output, family = extended[name]
    base, tokenizer = AutoTokenizer.from_pretrained(base_path), AutoTokenizer.from_pretrained(output)
    japanese, english = eval_texts
    base_ja = sum(len(base(text)["input_ids"]) for text in japanese)
    new_ja = sum(len(tokenizer(text)["input_ids"]) for text in japanese)
    assert new_ja < 0.8 * base_ja
    for text in english:
        assert tokenizer(text)["input_ids"] == base(text)["input_ids"], text[:60]
    report = read_json(output / "tokenizer_report.json")
    figures = report["characters_per_token"]
    assert figures["ja"]["extended"] > figures["ja"]["base"]
    assert figures["en"]["extended"] >= figures["en"]["base"]
    new_tokens = [token for token, index in tokenizer.get_vocab().items() if index >= len(base)]
    assert all(contains_japanese_script(token, family) for token in new_tokens if len(token) > 1)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_new_token_is_reachable_by_the_merges(extended, name):
    base_path, output, _ = extended[name]
    backend = Tokenizer.from_file(str(output / "tokenizer.json"))
    base_size = len(AutoTokenizer.from_pretrained(base_path))
    new_tokens = [token for token, index in backend.get_vocab().items() if index >= base_size]
    unreachable = [token for token in new_tokens if [t.value for t in backend.model.tokenize(token)] != [token]]
    assert unreachable == []


def test_japanese_words_use_new_tokens(extended):
    base_path, output, _ = extended["mistral"]
    tokenizer, base = AutoTokenizer.from_pretrained(output), AutoTokenizer.from_pretrained(base_path)
    text = "ファイルを編集してください。"
    pieces, base_pieces = tokenizer.tokenize(text), base.tokenize(text)
    assert len(pieces) * 2 < len(base_pieces) and not any(piece.startswith("<0x") for piece in pieces), pieces
    assert "".join(pieces) == "".join(base_pieces)


@pytest.mark.parametrize("name,minimum", [("mistral", 0.99), ("smollm2", 0.85)])
def test_merged_tokenizer_segments_japanese_as_the_trained_bpe(name, minimum, japanese_train_file, eval_texts,
                                                               mistral_tokenizer_path, smollm2_path):
    """Same words, same pieces: new merges follow the trained BPE's order (base merges intervene
    only where the base already merges those characters or bytes, which SmolLM2 does more)."""
    path = {"mistral": mistral_tokenizer_path, "smollm2": smollm2_path}[name]
    base_json = json.loads(AutoTokenizer.from_pretrained(path).backend_tokenizer.to_str())
    family = tokenizer_family(base_json, name)
    trained = train_bpe(base_json, family, read_texts([japanese_train_file])[0], 3000, show_progress=False)
    merged = merge_into_base(base_json, family, trained, max_new_tokens=10**6)
    merged_model = Tokenizer.from_str(json.dumps(merged.tokenizer_json)).model
    trained_model = standalone_tokenizer(base_json, family, trained).model
    words = sorted(set(re.findall(f"[{JAPANESE_WORD_CHARACTERS}]+", "".join(eval_texts[0]))))
    if family == BYTE_LEVEL:
        symbols = byte_level_symbols()
        words = ["".join(symbols[byte] for byte in word.encode("utf-8")) for word in words]
    else:  # characters the training text lacks fall back to bytes in the trained BPE only
        alphabet = {token for token in trained.tokens if len(token) == 1}
        words = [word for word in words if set(word) <= alphabet]
    assert len(words) > 1000
    same = sum([t.value for t in merged_model.tokenize(w)] == [t.value for t in trained_model.tokenize(w)]
               for w in words)
    assert same / len(words) >= minimum


def test_too_little_text_finishes_with_what_it_learned(monkeypatch, tmp_path, sample_data, capsys):
    texts, _ = read_texts([sample_data / "target" / "ja_target.jsonl.gz"])
    train = write_jsonl(tmp_path / "small.jsonl.gz", texts[:3])
    run_extension(monkeypatch, "--base_tokenizer", "offline:mistral-7b-tokenizer", "--train_files", train,
                  "--vocab_size", 32000 + 8192, "--output_dir", tmp_path / "out")
    report = read_json(tmp_path / "out" / "tokenizer_report.json")
    assert report["shortfall"] is not None
    assert 32000 < report["final_vocab_size"] < 40192
    assert report["shortfall"]["reached_vocab_size"] == report["final_vocab_size"]
    assert "WARNING: learned only" in capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == report["final_vocab_size"]


def test_vocab_size_not_above_base_is_an_error(monkeypatch, tmp_path, japanese_train_file):
    with pytest.raises(ExtensionError, match="not above the base's 32000"):
        run_extension(monkeypatch, "--base_tokenizer", "offline:mistral-7b-tokenizer",
                      "--train_files", japanese_train_file, "--vocab_size", 32000, "--output_dir", tmp_path)


def test_empty_training_text_is_an_error(monkeypatch, tmp_path):
    blank = write_jsonl(tmp_path / "blank.jsonl.gz", ["", ""])
    with pytest.raises(ExtensionError, match="no training text"):
        run_extension(monkeypatch, "--base_tokenizer", "offline:mistral-7b-tokenizer",
                      "--train_files", blank, "--vocab_size", 33024, "--output_dir", tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty.jsonl: the file is empty"):
        run_extension(monkeypatch, "--base_tokenizer", "offline:mistral-7b-tokenizer",
                      "--train_files", empty, "--vocab_size", 33024, "--output_dir", tmp_path / "out")


def test_non_japanese_training_text_is_an_error(monkeypatch, tmp_path, sample_data):
    english = sample_data / "eval" / "en_eval.jsonl.gz"
    with pytest.raises(ExtensionError, match=r"en_eval.jsonl.gz: only 0.0% .* must be Japanese"):
        run_extension(monkeypatch, "--base_tokenizer", "offline:mistral-7b-tokenizer",
                      "--train_files", english, "--vocab_size", 33024, "--output_dir", tmp_path / "out")


def _save_base(folder, model, pre_tokenizer=None):
    backend = Tokenizer(model)
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["Unigram", "WordPiece", "BPE without byte fallback"])
def test_unsupported_base_is_an_error(monkeypatch, tmp_path, japanese_train_file, kind):
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    model = {
        "Unigram": lambda: models.Unigram([("[UNK]", 0.0), ("a", -1.0), ("b", -1.0), ("ab", -1.5)], unk_id=0),
        "WordPiece": lambda: models.WordPiece(vocab, unk_token="[UNK]"),
        "BPE without byte fallback": lambda: models.BPE(vocab, [("a", "b")], unk_token="[UNK]"),
    }[kind]()
    base = _save_base(tmp_path / "base", model, pre_tokenizers.Whitespace())
    expected = "not lossless" if kind.startswith("BPE") else f"is {kind}, not BPE"
    with pytest.raises(ExtensionError, match=expected):
        run_extension(monkeypatch, "--base_tokenizer", base, "--train_files", japanese_train_file,
                      "--vocab_size", 64, "--output_dir", tmp_path / "out")


def test_contains_japanese_script_for_both_families():
    assert contains_japanese_script("▁日本", SENTENCEPIECE) and contains_japanese_script("。", SENTENCEPIECE)
    assert not contains_japanese_script("▁the", SENTENCEPIECE)
    assert contains_japanese_script("æĹ¥æľ¬", BYTE_LEVEL)  # "日本" in GPT-2 byte symbols
    assert contains_japanese_script("ãģ", BYTE_LEVEL)  # a fragment of a kana
    assert not contains_japanese_script("Ġthe", BYTE_LEVEL) and not contains_japanese_script("ĠãģA", BYTE_LEVEL)
    assert contains_japanese("日本")


def test_hub_layout_llama_tokenizer_is_rebuilt_sentencepiece_exact(monkeypatch, tmp_path, japanese_train_file,
                                                                  mistral_tokenizer_path, eval_texts):
    """mistralai/Mistral-7B-v0.1 on the Hub: tokenizer.model + a config naming LlamaTokenizer.

    transformers 5 rebuilds that class with a pipeline that differs from SentencePiece; the
    extension starts from tokenizer.model instead, so English stays SentencePiece-exact."""
    import shutil

    import sentencepiece

    hub = tmp_path / "Mistral-7B-v0.1"
    hub.mkdir()
    shutil.copyfile(f"{mistral_tokenizer_path}/tokenizer.model", hub / "tokenizer.model")
    (hub / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "legacy": True, "tokenizer_class": "LlamaTokenizer"}))
    as_loaded = AutoTokenizer.from_pretrained(hub)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(hub / "tokenizer.model"))
    texts = [" leading space", "  two leading spaces"] + eval_texts[1][:40]
    assert any(as_loaded(text)["input_ids"] != [1] + reference.encode(text) for text in texts)

    run_extension(monkeypatch, "--base_tokenizer", hub, "--train_files", japanese_train_file,
                  "--vocab_size", 32512, "--output_dir", tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    report = read_json(tmp_path / "out" / "tokenizer_report.json")
    assert report["base_pipeline_from"].startswith("tokenizer.model")
    assert report["sentencepiece_model"]["written"] and report["sentencepiece_model"]["ids_differ"] == 0
    extended_reference = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    for text in texts:
        assert tokenizer(text)["input_ids"] == [1] + reference.encode(text), text[:60]
        assert extended_reference.encode(text) == reference.encode(text), text[:60]  # English: same pieces
    assert len(tokenizer.tokenize("パッケージを編集してください")) < len(reference.encode("パッケージを編集してください"))


def test_japanese_only_tokens_off_keeps_other_pieces_too(japanese_train_file, mistral_tokenizer_path):
    base_json = json.loads(AutoTokenizer.from_pretrained(mistral_tokenizer_path).backend_tokenizer.to_str())
    texts = read_texts([japanese_train_file])[0][:60]
    trained = train_bpe(base_json, SENTENCEPIECE, texts, 1500, show_progress=False)
    only = merge_into_base(base_json, SENTENCEPIECE, trained, 400, japanese_only=True)
    everything = merge_into_base(base_json, SENTENCEPIECE, trained, 400, japanese_only=False)
    assert len(only.added_tokens) == len(everything.added_tokens) == 400
    assert all(contains_japanese_script(token, SENTENCEPIECE) for token in only.added_tokens)
    assert not all(contains_japanese_script(token, SENTENCEPIECE) for token in everything.added_tokens)
    assert only.skipped["not_japanese"] > 0 and everything.skipped["not_japanese"] == 0


def test_max_train_characters_limits_the_training_text(monkeypatch, tmp_path, japanese_train_file):
    run_extension(monkeypatch, "--base_tokenizer", "offline:mistral-7b-tokenizer", "--train_files", japanese_train_file,
                  "--max_train_characters", 20000, "--vocab_size", 32064, "--output_dir", tmp_path)
    report = read_json(tmp_path / "tokenizer_report.json")
    texts = read_texts([japanese_train_file])[0]
    assert 20000 <= report["train_characters"] < 20000 + max(map(len, texts))
    assert report["train_documents"] < len(texts)


def bundled_texts(sample_data):
    """Every text the repository bundles: eval, target, pool, SFT conversations and task items."""
    texts = []
    for path in sorted(sample_data.rglob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as stream:
            for line in stream:
                texts += [value for value in _strings(json.loads(line)) if value]
    return texts


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_tokenizer_model_gives_the_ids_of_tokenizer_json_on_every_bundled_text(extended, sample_data):
    """sentencepiece itself, reading the extended tokenizer.model, against our tokenizer.json."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    base_path, output, _ = extended["mistral"]
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((output / "tokenizer.model").read_bytes())
    base_model = sentencepiece_model_pb2.ModelProto()
    base_model.ParseFromString((Path(base_path) / "tokenizer.model").read_bytes())
    tokenizer = Tokenizer.from_file(str(output / "tokenizer.json"))
    assert len(model.pieces) == tokenizer.get_vocab_size() == 33024
    assert model.trainer_spec.byte_fallback and model.normalizer_spec == base_model.normalizer_spec
    assert list(model.pieces)[:32000] == list(base_model.pieces)  # pieces, scores and types unchanged
    new_scores = [piece.score for piece in model.pieces[32000:]]
    assert max(new_scores) < min(piece.score for piece in base_model.pieces)
    assert len(set(new_scores)) == len(new_scores)
    assert all(model.pieces[index].piece == token for token, index in tokenizer.get_vocab().items())

    reference = sentencepiece.SentencePieceProcessor(model_file=str(output / "tokenizer.model"))
    texts = bundled_texts(sample_data) + ADVERSARIAL_TEXTS + EXTRA_ROUND_TRIP
    assert len(texts) > 3000
    tokenizer.encode_special_tokens = True  # as data is tokenised; sentencepiece never parses "<s>" in text
    differ = [text[:60] for text in texts if tokenizer.encode(text, add_special_tokens=False).ids != reference.encode(text)]
    assert differ == []
    japanese = "パッケージをインストールしてください。"
    assert len(reference.encode(japanese)) < len(sentencepiece.SentencePieceProcessor(
        model_file=str(Path(base_path) / "tokenizer.model")).encode(japanese))


def test_gguf_conversion_tokenises_as_we_do_in_llama_cpp(extended, sample_data, tmp_path):
    """llama.cpp's converter logic (gguf package) on the extended folder, then llama.cpp's own tokenizer."""
    import llama_cpp

    from toolkit.tokenizer_extension import write_gguf_vocabulary

    _, output, _ = extended["mistral"]
    gguf_file = write_gguf_vocabulary(output, tmp_path / "vocab.gguf")
    llama = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
    assert (llama.n_vocab(), llama.token_bos(), llama.token_eos()) == (33024, 1, 2)
    tokenizer = AutoTokenizer.from_pretrained(output)
    texts = bundled_texts(sample_data)[::4] + ADVERSARIAL_TEXTS
    differ = [text[:60] for text in texts
              if llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)
              != tokenizer(text, split_special_tokens=True)["input_ids"]]
    assert differ == []


def test_control_token_strings_in_eval_text_are_text(monkeypatch, tmp_path, japanese_train_file):
    """An eval document that spells <s> and </s> is measured and round-tripped as text."""
    special = ["文書の途中の</s>終端記号<s>と<unk>", "a page quoting <s>[INST] hi [/INST]</s>"]
    eval_file = write_jsonl(tmp_path / "eval.jsonl.gz", special)
    run_extension(monkeypatch, "--base_tokenizer", "offline:mistral-7b-tokenizer", "--train_files", japanese_train_file,
                  "--eval_files", eval_file, "--vocab_size", 32064, "--output_dir", tmp_path / "out")
    report = read_json(tmp_path / "out" / "tokenizer_report.json")
    assert report["round_trip"]["lossless"] and report["problems"] == []
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in special:
        ids = tokenizer(text, split_special_tokens=True, add_special_tokens=False)["input_ids"]
        assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
        assert tokenizer.decode(ids) == text  # no space inserted after "<s>"
    figures = report["eval"][str(eval_file)]["extended"]
    assert figures["tokens"] == sum(len(tokenizer(text, split_special_tokens=True, add_special_tokens=False)
                                        ["input_ids"]) for text in special)


def test_a_failed_check_leaves_the_output_folder_without_a_tokenizer(monkeypatch, tmp_path, japanese_train_file):
    monkeypatch.setattr(extend_tokenizer, "round_trip_failures", lambda tokenizer, texts: [{"text": "x", "decoded": "y"}])
    with pytest.raises(ExtensionError, match="failed its checks .*decode.*not moved"):
        run_extension(monkeypatch, "--base_tokenizer", "offline:mistral-7b-tokenizer", "--train_files",
                      japanese_train_file, "--vocab_size", 32064, "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    (staging,) = (tmp_path / "out").glob(".tokenizer-*")
    assert read_json(staging / "tokenizer_report.json")["problems"]
