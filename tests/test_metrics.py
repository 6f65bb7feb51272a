import math

import torch

from toolkit.metrics import bits_per_character, text_nll


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

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 50) for c in text]}


class PairTokenizer(CharacterTokenizer):
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (sum(map(ord, text[i:i + 2])) % 50) for i in range(0, len(text), 2)]}


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
