"""The fair prompt: the generation prompt ends where a base and an extended tokenizer agree."""

import pytest
from transformers import AutoTokenizer

from extended_tokenizers import extend_with_merges
from toolkit.chat import (
    DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, answer_text, prompt_text, read_chat_records, render, tokenize_chat,
)

# Answers that start with a word the extension merges into one "▁X" token.
CHATS = [
    [{"role": "user", "content": "見出しを一行で答えてください。\n\n東京のデータを設定します。"},
     {"role": "assistant", "content": "東京のデータ設定"}],
    [{"role": "user", "content": "次の文章の続きを一文書いてください。"}, {"role": "assistant", "content": "日本語のファイルです。"}],
    [{"role": "user", "content": "What is GIMP?"}, {"role": "assistant", "content": "An image editor."}],
]


@pytest.fixture(scope="module")
def base_and_extended(mistral_tokenizer_path, tmp_path_factory):
    extended = extend_with_merges(mistral_tokenizer_path, ["東京", "日本語", "データ", "ファイル"],
                                  tmp_path_factory.mktemp("extended"))
    return AutoTokenizer.from_pretrained(mistral_tokenizer_path), AutoTokenizer.from_pretrained(extended)


def test_the_prompt_text_is_the_same_for_both_tokenizers_and_ends_without_a_space(base_and_extended):
    base, extended = base_and_extended
    for chat in CHATS:
        user = chat[0]["content"]
        prompt = prompt_text(base, user, DEFAULT_CHAT_TEMPLATE)
        assert prompt == prompt_text(extended, user, DEFAULT_CHAT_TEMPLATE)
        assert prompt.endswith("[/INST]") and prompt == f"<s>[INST] {user} [/INST]"
        # the separator belongs to the answer, the same text for both
        assert answer_text(base, user, chat[1]["content"], DEFAULT_CHAT_TEMPLATE) == " " + chat[1]["content"]


def test_the_prompt_tokens_are_the_start_of_the_training_tokens_for_both(base_and_extended):
    """At generation time each model continues from exactly the tokens it saw in training."""
    for tokenizer in base_and_extended:
        for chat in CHATS:
            prompt = tokenizer(prompt_text(tokenizer, chat[0]["content"], DEFAULT_CHAT_TEMPLATE),
                               add_special_tokens=False)["input_ids"]
            trained = tokenize_chat(tokenizer, chat, DEFAULT_CHAT_TEMPLATE)
            assert trained["input_ids"][: len(prompt)] == prompt
            assert tokenizer.convert_ids_to_tokens(prompt[-1]) == "]"  # no dangling "▁"
            # everything after the prompt is learned, the separator included, and nothing before it
            assert all(label == IGNORE_INDEX for label in trained["labels"][: len(prompt)])
            assert all(label != IGNORE_INDEX for label in trained["labels"][len(prompt):])
            assert tokenizer.decode(trained["input_ids"][len(prompt):], skip_special_tokens=True).strip() == \
                chat[1]["content"]


def test_the_extension_merges_the_answers_first_word(base_and_extended):
    """Why the old prompt (ending in " ") was unfair: only the extended tokenizer merges "▁東京"."""
    base, extended = base_and_extended
    text = render(base, CHATS[0], DEFAULT_CHAT_TEMPLATE)
    first_answer_token = {}
    for name, tokenizer in (("base", base), ("extended", extended)):
        prompt_length = len(tokenizer(prompt_text(tokenizer, CHATS[0][0]["content"], DEFAULT_CHAT_TEMPLATE),
                                      add_special_tokens=False)["input_ids"])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        first_answer_token[name] = tokenizer.convert_ids_to_tokens(ids[prompt_length])
    assert first_answer_token == {"base": "▁", "extended": "▁東京"}


def test_the_bundled_sft_chats_share_the_prompt_tokens(mistral_tokenizer_path, sample_data):
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_path)
    for chat in read_chat_records([sample_data / "sft" / "sft_ja.jsonl"])[:30]:
        prompt = tokenizer(prompt_text(tokenizer, chat[0]["content"], DEFAULT_CHAT_TEMPLATE),
                           add_special_tokens=False)["input_ids"]
        assert tokenize_chat(tokenizer, chat, DEFAULT_CHAT_TEMPLATE)["input_ids"][: len(prompt)] == prompt


@pytest.mark.parametrize("path_fixture", ["mistral_tokenizer_path", "smollm2_path"])
def test_chats_without_special_strings_tokenise_exactly_as_the_tokenizer_does(path_fixture, request, sample_data):
    from toolkit.chat import chat_template, content_spans, encode_rendered

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(path_fixture))
    template = chat_template(tokenizer)
    for chat in read_chat_records([sample_data / "sft" / "sft_ja.jsonl"])[:20] + CHATS:
        text = render(tokenizer, chat, template)
        ids, offsets = encode_rendered(tokenizer, text, content_spans(text, chat))
        expected = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == expected["input_ids"] and offsets == [tuple(o) for o in expected["offset_mapping"]]


@pytest.mark.parametrize("path_fixture", ["mistral_tokenizer_path", "smollm2_path"])
def test_special_token_strings_in_contents_are_text(path_fixture, request):
    from toolkit.chat import chat_template, encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(path_fixture))
    template = chat_template(tokenizer)
    eos = tokenizer.eos_token_id
    tricky = f"終わりは{tokenizer.eos_token}と書きます。<s>も<|im_end|>も文字です。"
    chat = [{"role": "user", "content": tricky}, {"role": "assistant", "content": tricky}]
    example = tokenize_chat(tokenizer, chat, template)
    specials = set(tokenizer.all_special_ids)
    template_specials = [t for t in tokenizer(render(tokenizer, [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}], template),
                                              add_special_tokens=False)["input_ids"] if t in specials]
    # the only special tokens are the ones the template writes for any chat
    assert [t for t in example["input_ids"] if t in specials] == template_specials
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert learned.count(eos) == 1 and learned[-1] == eos
    assert tokenizer.decode(learned[:-1]).strip() == tricky
    prompt = encode_prompt(tokenizer, tricky, template)
    assert example["input_ids"][: len(prompt)] == prompt and tokenizer.decode(prompt).count(tricky) == 1
