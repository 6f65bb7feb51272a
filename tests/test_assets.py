import json

import pytest
import sentencepiece
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from toolkit import assets
from toolkit.corpus import read_texts

ADVERSARIAL = [
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "a\n\nb  c\t\td",
    "絵文字 😀🎌 と ｶﾀｶﾅ（半角）と ＡＢＣ（全角）",
    "𠮷野家の𩸽定食",  # kanji outside the BMP, unlikely in the vocabulary
    "control \x01\x07 characters",
    " " * 40 + "long run of spaces",
    "",
]


def bundled_texts(sample_data):
    texts, _ = read_texts(
        [sample_data / "eval" / "ja_eval.jsonl.gz", sample_data / "eval" / "en_eval.jsonl.gz",
         sample_data / "target" / "ja_target.jsonl.gz"]
    )
    return texts


def test_mistral_tokenizer_matches_sentencepiece(mistral_tokenizer_path, sample_data):
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_path)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(assets.mistral_sentencepiece_model()))
    assert len(tokenizer) == reference.get_piece_size() == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    texts = bundled_texts(sample_data) + ADVERSARIAL
    assert any("日本" in text for text in texts) and any(" the " in text for text in texts)
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids == [reference.bos_id()] + reference.encode(text), text[:60]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_mistral_tokenizer_folder_has_hub_layout(mistral_tokenizer_path):
    from pathlib import Path

    folder = Path(mistral_tokenizer_path)
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "tokenizer.model").read_bytes() == assets.mistral_sentencepiece_model().read_bytes()


def test_smollm2_is_a_real_pretrained_model(smollm2_path, sample_data):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    texts, _ = read_texts([sample_data / "eval" / "en_eval.jsonl.gz"])
    batch = tokenizer(texts[0][:1000], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    # A random 49k-vocabulary model scores about ln(49152) = 10.8 nats per token.
    assert torch.isfinite(loss) and loss.item() < 5.0
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in continuation


def test_untied_smollm2_is_the_tied_model_with_a_separate_head(smollm2_path):
    untied_path = assets.resolve("offline:smollm2-135m-untied")
    tied, untied = AutoModelForCausalLM.from_pretrained(smollm2_path), AutoModelForCausalLM.from_pretrained(untied_path)
    assert tied.config.tie_word_embeddings and not untied.config.tie_word_embeddings
    head, embeddings = untied.get_output_embeddings().weight, untied.get_input_embeddings().weight
    assert head.data_ptr() != embeddings.data_ptr()  # two parameters: new rows can differ
    assert torch.equal(head, embeddings) and torch.equal(embeddings, tied.get_input_embeddings().weight)
    ids = AutoTokenizer.from_pretrained(untied_path)("東京は日本の首都です。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(untied(ids).logits, tied(ids).logits, rtol=0, atol=0)  # step 0 is identical


def test_tiny_mistral_uses_the_real_tokenizer(tiny_mistral_path, mistral_tokenizer_path):
    config = AutoConfig.from_pretrained(tiny_mistral_path)
    assert config.model_type == "mistral" and config.hidden_size == 64 and config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(mistral_tokenizer_path).get_vocab()
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path)
    assert model.get_input_embeddings().weight.shape == (32000, 64)


def test_resolve_passes_other_ids_through_and_rejects_unknown_names():
    assert assets.resolve("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"
    assert assets.resolve("/some/local/folder") == "/some/local/folder"
    with pytest.raises(ValueError, match="unknown offline asset 'offline:nope'.*offline:smollm2-135m"):
        assets.resolve("offline:nope")


def test_resolve_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LANGTOOLKIT_CACHE", str(tmp_path))
    folder = assets.resolve("offline:mistral-7b-tokenizer")
    assert folder.startswith(str(tmp_path)) and (tmp_path / "mistral-7b-tokenizer" / ".complete").exists()
    stamp = (tmp_path / "mistral-7b-tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert assets.resolve("offline:mistral-7b-tokenizer") == folder
    assert (tmp_path / "mistral-7b-tokenizer" / "tokenizer.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "mistral-7b-tokenizer" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
