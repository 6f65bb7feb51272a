"""Embedding extension: resize to a multiple of 64 and initialise new rows from the base
model's own rows for each new token's base decomposition (toolkit/embeddings.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from extended_tokenizers import WORDS, extend_with_added_tokens, extend_with_merges
from toolkit.embeddings import check_extension, decompose_new_tokens, extend_embeddings


@pytest.fixture(scope="module")
def mistral_merged(tiny_mistral_path, tmp_path_factory):
    return extend_with_merges(tiny_mistral_path, WORDS, tmp_path_factory.mktemp("mistral_merged"))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_extended_tokenizer_fixture_is_an_extension(tiny_mistral_path, mistral_merged):
    base, extended = AutoTokenizer.from_pretrained(tiny_mistral_path), AutoTokenizer.from_pretrained(mistral_merged)
    check_extension(base, extended)
    text = "日本語の設定"
    assert len(extended(text)["input_ids"]) < len(base(text)["input_ids"])
    assert extended.decode(extended(text, add_special_tokens=False)["input_ids"]) == text


def test_subword_mean_untied_mistral(tiny_mistral_path, mistral_merged):
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path)
    tokenizer = AutoTokenizer.from_pretrained(mistral_merged)
    model = load(tiny_mistral_path)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    report = extend_embeddings(model, tokenizer, base_tokenizer, init="subword_mean")
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tokenizer) and rows - len(tokenizer) < 64
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert model.config.vocab_size == rows == report["embedding_rows_after"]
    assert report["new_tokens"] == len(tokenizer) - len(base_tokenizer) > 0
    new_input = model.get_input_embeddings().weight.detach()
    new_output = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(new_input[:32000], old_input)
    torch.testing.assert_close(new_output[:32000], old_output)
    word_id = tokenizer.convert_tokens_to_ids("▁日本語")
    pieces = base_tokenizer("日本語", add_special_tokens=False)["input_ids"]  # ▁ 日 本 語
    assert base_tokenizer.convert_ids_to_tokens(pieces) == ["▁", "日", "本", "語"]
    torch.testing.assert_close(new_input[word_id], old_input[pieces].mean(0))
    torch.testing.assert_close(new_output[word_id], old_output[pieces].mean(0))
    # input and output rows are initialised from their own matrices
    assert not torch.allclose(new_input[word_id], new_output[word_id])


def test_added_tokens_drop_the_lone_word_start_piece(tiny_mistral_path, tmp_path):
    folder = extend_with_added_tokens(tiny_mistral_path, ["東京都"], tmp_path / "added")
    base_tokenizer, tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path), AutoTokenizer.from_pretrained(folder)
    (index, pieces), = decompose_new_tokens(base_tokenizer, tokenizer).items()
    assert index == 32000
    assert base_tokenizer.convert_ids_to_tokens(pieces) == ["東", "京", "都"]
    model = load(tiny_mistral_path)
    old = model.get_input_embeddings().weight.detach().clone()
    extend_embeddings(model, tokenizer, base_tokenizer)
    torch.testing.assert_close(model.get_input_embeddings().weight[32000].detach(), old[pieces].mean(0))


def test_tied_smollm2(smollm2_path, tmp_path):
    folder = extend_with_merges(smollm2_path, WORDS, tmp_path / "smol")
    base_tokenizer, tokenizer = AutoTokenizer.from_pretrained(smollm2_path), AutoTokenizer.from_pretrained(folder)
    model = load(smollm2_path)
    assert model.config.tie_word_embeddings
    old = model.get_input_embeddings().weight.detach().clone()
    report = extend_embeddings(model, tokenizer, base_tokenizer)
    assert report["tied_embeddings"]
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()
    word_id = tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(tokenizer("データ", add_special_tokens=False)["input_ids"])[0])
    assert word_id >= len(base_tokenizer)
    pieces = base_tokenizer("データ", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(weight[word_id].detach(), old[pieces].mean(0))
    # the model still runs, and the output over the new vocabulary has the new size
    logits = model(input_ids=torch.tensor([[1, word_id]])).logits
    assert logits.shape[-1] == weight.shape[0] == 49216


def test_inits_differ(tiny_mistral_path, mistral_merged):
    base_tokenizer, tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path), AutoTokenizer.from_pretrained(mistral_merged)
    word_id = tokenizer.convert_tokens_to_ids("▁日本語")
    rows = {}
    for init in ("subword_mean", "hf_mean", "random"):
        model = load(tiny_mistral_path)
        extend_embeddings(model, tokenizer, base_tokenizer, init=init)
        rows[init] = model.get_input_embeddings().weight[:, :].detach()
    mean = rows["hf_mean"][:32000].mean(0)
    torch.testing.assert_close(rows["hf_mean"][word_id], mean, atol=1e-3, rtol=0)
    assert not torch.allclose(rows["subword_mean"][word_id], mean, atol=1e-3)
    assert not torch.allclose(rows["random"][word_id], mean, atol=1e-3)
    with pytest.raises(ValueError, match="embedding_init"):
        extend_embeddings(load(tiny_mistral_path), tokenizer, base_tokenizer, init="zeros")


def test_not_an_extension_is_refused(tiny_mistral_path, smollm2_path):
    model = load(tiny_mistral_path)
    with pytest.raises(ValueError, match="not an extension"):
        extend_embeddings(model, AutoTokenizer.from_pretrained(smollm2_path), AutoTokenizer.from_pretrained(tiny_mistral_path))
