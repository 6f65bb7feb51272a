"""Extended tokenizers for tests, built the two ways a real extension can look (shared by
test_embeddings.py and test_pretrain.py; pytest puts tests/ on sys.path)."""

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer

WORDS = ["日本語", "東京", "データ", "パッケージ", "インストール", "設定", "ファイル", "コマンド", "システム", "する"]


def extend_with_merges(base_folder, words, output_folder) -> Path:
    """Copy `base_folder`'s tokenizer and append BPE merges so each word becomes one token.

    The new tokens are ordinary model-vocabulary tokens (ids after every existing one), in
    the tokenizer's own pre-tokenized form ("▁日本語" for SentencePiece-style, byte-level
    strings for GPT-2-style), as a trained extension produces them.
    """
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(base_folder) / name).exists():
            shutil.copyfile(Path(base_folder) / name, output_folder / name)
    base = AutoTokenizer.from_pretrained(base_folder)
    backend = base.backend_tokenizer
    data = json.loads(backend.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    next_id = len(base)
    for word in words:
        text = backend.normalizer.normalize_str(word) if backend.normalizer else word
        if backend.pre_tokenizer:
            (text, _), = backend.pre_tokenizer.pre_tokenize_str(text)
        pieces = [token.value for token in backend.model.tokenize(text)]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append([current, piece])
            current += piece
            if current not in vocab:
                vocab[current] = next_id
                next_id += 1
    Tokenizer.from_str(json.dumps(data)).save(str(output_folder / "tokenizer.json"))
    return output_folder


def extend_with_added_tokens(base_folder, words, output_folder) -> Path:
    """The base tokenizer plus `tokenizer.add_tokens(words)` (AddedToken entries)."""
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    tokenizer.add_tokens(words)
    tokenizer.save_pretrained(output_folder)
    return Path(output_folder)
