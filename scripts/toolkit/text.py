"""Character classes and counts that several stages need (selection, tokenizer, eval)."""

import re

# Hiragana, katakana (incl. half-width and phonetic extensions), CJK ideographs
# (incl. extension A and compatibility), and the iteration mark 々, as the body of a
# regex character class (the tokenizer extension builds its own classes from it).
JAPANESE_WORD_CHARACTERS = (
    "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3005"
)
JAPANESE_CHARACTER = re.compile(f"[{JAPANESE_WORD_CHARACTERS}]")


def japanese_char_ratio(text: str) -> float:
    """Share of non-space characters that are kana or kanji (0.0 for empty text)."""
    non_space = len(text) - sum(character.isspace() for character in text)
    if non_space == 0:
        return 0.0
    return len(JAPANESE_CHARACTER.findall(text)) / non_space


def contains_japanese(text: str) -> bool:
    return JAPANESE_CHARACTER.search(text) is not None
