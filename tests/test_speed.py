"""Decoding speed by forced decoding of the same reference text, and the descriptive free generation."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from extended_tokenizers import extend_with_merges
from toolkit.speed import ForcedDecoder, forced_decoding_speeds, speed_ratio, split_prompt_and_reference

PROMPTS = ["日本語の設定ファイルについて説明します。", "GIMP は画像編集ソフトです。"]
# the test tokenizer's added words are SentencePiece pieces ("▁日本語"): they apply after a space
REFERENCES = ["設定 ファイル は 日本語 で 書けます。 ファイル の 場所", "メニュー も 日本語 で、 設定 で 変えられます。"]


@pytest.fixture(scope="module")
def arms(tiny_mistral_path, tmp_path_factory):
    """tiny-mistral and the same model with a few Japanese words added as tokens (a denser tokenizer)."""
    folder = extend_with_merges(tiny_mistral_path, ["日本語", "設定", "ファイル"], tmp_path_factory.mktemp("extended"))
    extended = AutoModelForCausalLM.from_pretrained(tiny_mistral_path)
    extended.resize_token_embeddings(len(AutoTokenizer.from_pretrained(folder)))
    return {"base": (AutoModelForCausalLM.from_pretrained(tiny_mistral_path).eval(),
                     AutoTokenizer.from_pretrained(tiny_mistral_path)),
            "extended": (extended.eval(), AutoTokenizer.from_pretrained(folder))}


def test_prompt_and_reference_are_the_text_tokenised_whole(arms):
    for _, tokenizer in arms.values():
        for prompt, reference in zip(PROMPTS, REFERENCES):
            prompt_ids, reference_ids = split_prompt_and_reference(tokenizer, prompt, reference)
            whole = tokenizer(prompt + reference, add_special_tokens=False)["input_ids"]
            assert prompt_ids + reference_ids == whole and reference_ids
            assert tokenizer.decode(reference_ids).endswith(reference[-5:])


def test_forced_decoding_writes_the_reference_token_by_token(arms):
    model, tokenizer = arms["extended"]
    decoder = ForcedDecoder(model, tokenizer, PROMPTS, REFERENCES, batch_size=2)
    assert decoder() > 0 and decoder(check=True) > 0  # check: every row wrote exactly its reference tokens
    assert decoder.characters == sum(map(len, REFERENCES))
    assert decoder.tokens == sum(len(split_prompt_and_reference(tokenizer, p, r)[1]) for p, r in zip(PROMPTS, REFERENCES))


def test_characters_per_second_ratio_is_tokens_per_second_ratio_times_characters_per_token_ratio(arms):
    speeds = forced_decoding_speeds(arms, PROMPTS, REFERENCES, batch_size=2, repeats=3)
    base, extended = speeds["base"], speeds["extended"]
    # both arms cover the same reference characters; the denser tokenizer needs fewer tokens for them
    assert base["characters"] == extended["characters"] == sum(map(len, REFERENCES))
    assert extended["tokens"] < base["tokens"]
    for name, figures in speeds.items():
        tokenizer = arms[name][1]
        tokens = sum(len(split_prompt_and_reference(tokenizer, p, r)[1]) for p, r in zip(PROMPTS, REFERENCES))
        assert figures["characters_per_token"] == pytest.approx(sum(map(len, REFERENCES)) / tokens)
        assert len(figures["rounds_seconds"]) == 3 and figures["seconds"] == sorted(figures["rounds_seconds"])[1]
    ratio = speed_ratio(speeds, "extended", "base")
    assert ratio["characters_per_second"] == pytest.approx(ratio["tokens_per_second"] * ratio["characters_per_token"],
                                                           rel=1e-9)
    # the figures as the table prints them (2 decimals) agree within rounding
    assert abs(round(ratio["characters_per_second"], 2)
               - round(ratio["tokens_per_second"], 2) * round(ratio["characters_per_token"], 2)) < 0.02 * max(
        1, ratio["characters_per_second"])
    with pytest.raises(ValueError, match="one reference per prompt"):
        forced_decoding_speeds(arms, PROMPTS, REFERENCES[:1])
