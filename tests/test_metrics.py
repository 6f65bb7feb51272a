import math

import torch

from toolkit.metrics import bits_per_character, character_windows, count_windows, text_nll, token_windows


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/vocab: NLL is exactly ln(vocab) per token."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


class CharacterTokenizer:
    name_or_path = "characters"
    bos_token_id = 0
    eos_token_id = 1
    width = 1

    def __call__(self, text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=False):
        spans = [(i, min(i + self.width, len(text))) for i in range(0, len(text), self.width)]
        encoding = {"input_ids": [2 + (sum(map(ord, text[a:b])) % 50) for a, b in spans]}
        if return_offsets_mapping:
            encoding["offset_mapping"] = spans
        return encoding


class PairTokenizer(CharacterTokenizer):
    width = 2


class RecordingModel(UniformModel):
    """Remembers the length of every window it is given."""

    def __init__(self, vocab):
        super().__init__(vocab)
        self.window_lengths = []

    def forward(self, input_ids):
        self.window_lengths.append(input_ids.shape[1])
        return super().forward(input_ids)


def test_sliding_window_scores_every_token_once():
    model = UniformModel(vocab=64)
    ids = list(range(1, 40))
    for max_length, stride in [(8, 4), (8, 7), (64, None), (5, 1)]:
        assert math.isclose(text_nll(model, ids, max_length, stride), (len(ids) - 1) * math.log(64), rel_tol=1e-6)


def test_bits_per_character_hand_computed_for_two_tokenizers():
    model = UniformModel(vocab=64)
    text = "日本語のテキスト"  # 8 characters, 24 UTF-8 bytes
    per_char = bits_per_character(model, CharacterTokenizer(), [text])
    per_pair = bits_per_character(model, PairTokenizer(), [text])
    # 8 tokens x 6 bits / 8 characters, and 4 tokens x 6 bits / 8 characters
    assert math.isclose(per_char.bits_per_character, 6.0, rel_tol=1e-6) and per_char.tokens == 8
    assert math.isclose(per_pair.bits_per_character, 3.0, rel_tol=1e-6) and per_pair.tokens == 4
    assert math.isclose(per_char.bits_per_byte, 8 * 6 / 24, rel_tol=1e-6) and per_pair.characters_per_token == 2.0


def test_character_windows_give_every_tokenizer_the_same_context_in_characters():
    text = "日本語のテキストです。" * 20  # 220 characters
    per_token = {}
    for tokenizer in (CharacterTokenizer(), PairTokenizer()):
        model = RecordingModel(vocab=64)
        figures = bits_per_character(model, tokenizer, [text], window_characters=64)
        # every token scored exactly once, whatever the windows
        assert math.isclose(figures.nll_nats, figures.tokens * math.log(64), rel_tol=1e-6)
        per_token[tokenizer.width] = model.window_lengths
    # a window of 64 characters is 64 (+BOS) one-character tokens or 32 two-character tokens
    assert max(per_token[1]) == 65 and max(per_token[2]) == 33
    assert len(per_token[1]) == len(per_token[2])  # same number of windows over the same text


def test_character_windows_score_each_token_once_and_respect_the_width():
    starts = [0] + list(range(0, 99, 3))
    ends = [0] + [s + 3 for s in starts[1:]]
    windows = character_windows(starts, ends, window_characters=30, stride_characters=12)
    scored, until = [], 1
    for start, end in windows:
        assert ends[end - 1] - starts[start] <= 30
        scored += list(range(max(until, start + 1), end))
        until = end
    assert scored == list(range(1, len(ends)))
    assert token_windows(40, 8, 4)[:2] == [(0, 8), (4, 12)] and count_windows(40, 8, 4) == len(token_windows(40, 8, 4))


def test_special_token_text_is_scored_as_characters(smollm2_path):
    from transformers import AutoTokenizer

    from toolkit.metrics import token_ids_with_bos

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    ids = token_ids_with_bos(tokenizer, "a<|im_end|>b")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids[1:]
    assert tokenizer.decode(ids[1:]) == "a<|im_end|>b"
