"""Extending a BPE tokenizer with pieces learned on Japanese text, and measuring tokenizers.

The extension trains a new BPE with the `tokenizers` library on Japanese text, using the
base tokenizer's own normaliser and pre-tokenisation, then appends what it learned to the
base: base tokens keep their ids and strings, base merges keep their priority, and the new
merges follow in the order the new BPE learned them. Each new token gets exactly one merge:
the pair the merged tokenizer actually holds when it reaches that token (the trained pair,
unless a base merge already took a different path), so the merged tokenizer segments
Japanese as the trained one does without adding "every split of every token".

Two families of base tokenizers are lossless and supported:
  - SentencePiece-style BPE with byte fallback (Llama 2, Mistral): characters missing from
    the vocabulary become <0xNN> byte tokens. New Japanese characters become tokens first,
    so the new merges start from them.
  - byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): every byte has a symbol. Byte symbols a
    base lacks (some GGUF-converted vocabularies do) are added so that no byte is lost.
"""

import json
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from toolkit.text import JAPANESE_WORD_CHARACTERS, japanese_char_ratio

SENTENCEPIECE = "sentencepiece_byte_fallback"
BYTE_LEVEL = "byte_level"

# Kana and kanji (toolkit.text) plus Japanese punctuation and full-width forms: a new
# token "contains Japanese script" when it holds one of these.
JAPANESE_SYMBOLS = "\u3000-\u3004\u3006-\u303f\uff01-\uff65"
JAPANESE_SCRIPT = re.compile(f"[{JAPANESE_WORD_CHARACTERS}{JAPANESE_SYMBOLS}]")

# SentencePiece's trainer never lets a piece cross whitespace ("▁" starts a piece), a
# script boundary or a digit. Bases like Mistral keep no pre-tokenizer in tokenizer.json
# (that split lives inside SentencePiece's trainer), so the new BPE is trained on
# normalised text split the same way.
SENTENCEPIECE_TRAINING_SPLIT = (
    f"▁?[{JAPANESE_WORD_CHARACTERS}]+|[{JAPANESE_SYMBOLS}]|[0-9]|"
    f"▁?[^▁0-9{JAPANESE_WORD_CHARACTERS}{JAPANESE_SYMBOLS}]+|▁+"
)

ADVERSARIAL_TEXTS = [
    "",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "a\n\nb  c\t\td",
    "絵文字 😀🎌👨‍👩‍👧 と ｶﾀｶﾅ（半角）と ＡＢＣ１２３（全角）",
    "𠮷野家の𩸽定食と鬱蘊齉龘",  # kanji outside the BMP and rare ones, unlikely in any training text
    "control \x00\x01\x04\x07\x1b\x7f characters",
    " " * 40 + "long run of spaces" + "\n" * 12 + "\t" * 9,
    "日本語とEnglishとРусскийと한국어と中文混在。Mixed ｽｸﾘﾌﾟﾄ!",
    "Ġ ĠĠ Ċ are byte-level symbols, not spaces or newlines",
    "\u3000全角スペース\u3000と\u200bゼロ幅\ufeffと結合文字か\u3099",
    # Web text spells control tokens; in data they are text, never BOS/EOS/UNK.
    "<s>[INST] a page quoting a chat template [/INST]</s> and <unk>",
    "文書の途中の</s>終端記号<s>と<unk>",
    "<|endoftext|><|im_start|>user\nhi<|im_end|> spelled in a byte-level base's web text",
]


class ExtensionError(ValueError):
    """Input the extension cannot work with, with what to do about it."""


# --------------------------------------------------------------------------- measuring

@contextmanager
def special_tokens_as_text(tokenizer):
    """The `tokenizers.Tokenizer` behind `tokenizer`, encoding "<s>" in text as the characters "<s>".

    Text from data is never a control token: a web page that spells "</s>" must not end a
    document. This is `split_special_tokens=True` of transformers tokenizers, applied to
    the backend for the duration of the block (and restored after).
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield backend
    finally:
        backend.encode_special_tokens = previous


def characters_per_token(tokenizer, texts) -> dict:
    """Characters, tokens (no special tokens) and characters per token of `texts`.

    `tokenizer` is a transformers tokenizer or a `tokenizers.Tokenizer`. Special-token
    strings in the texts count as the text they are.
    """
    characters = sum(len(text) for text in texts)
    with special_tokens_as_text(tokenizer) as backend:
        tokens = sum(len(encoding.ids) for encoding in backend.encode_batch(list(texts), add_special_tokens=False))
    return {"characters": characters, "tokens": tokens, "characters_per_token": characters / max(tokens, 1)}


def round_trip_failures(tokenizer, texts) -> list:
    """The texts for which decode(encode(text)) != text (each shortened for a report)."""
    failures = []
    with special_tokens_as_text(tokenizer) as backend:
        for text in texts:
            ids = backend.encode(text, add_special_tokens=False).ids
            decoded = backend.decode(ids, skip_special_tokens=False)
            if decoded != text:
                failures.append({"text": text[:80], "decoded": decoded[:80]})
    return failures


def encoding_throughput(tokenizer, texts, repeats=3) -> float:
    """MB/s of UTF-8 text encoded one text at a time on one thread (best of `repeats`)."""
    size = sum(len(text.encode("utf-8")) for text in texts)
    best = math.inf
    with special_tokens_as_text(tokenizer) as backend:
        for _ in range(repeats):
            started = time.perf_counter()
            for text in texts:
                backend.encode(text, add_special_tokens=False)
            best = min(best, time.perf_counter() - started)
    return size / 1e6 / best


def is_japanese_text(texts, threshold=0.2) -> bool:
    return japanese_char_ratio("".join(texts)) >= threshold


# --------------------------------------------------------------------------- the base

@dataclass
class BaseTokenizer:
    """A base tokenizer as the extension and the benchmarks load it."""
    name: str                 # as given: Hub id, folder or offline:NAME
    resolved: str             # Hub id or folder
    tokenizer: object         # transformers tokenizer
    tokenizer_json: dict      # its tokenizers pipeline
    source: str               # where the pipeline came from
    sentencepiece_model: object = None  # Path of the base's tokenizer.model, when it ships one


def sentencepiece_model_file(resolved: str):
    """The base's SentencePiece tokenizer.model (local folder or Hub), or None."""
    from huggingface_hub import hf_hub_download

    local = Path(resolved) / "tokenizer.model"
    if local.is_file():
        return local
    if Path(resolved).is_dir():
        return None
    try:
        return Path(hf_hub_download(resolved, "tokenizer.model"))
    except Exception as error:  # offline, gated or absent: the caller says what it does without it
        print(f"note: {resolved}: no tokenizer.model ({type(error).__name__})", file=sys.stderr)
        return None


def load_base_tokenizer(name_or_path: str) -> BaseTokenizer:
    """The base as transformers loads it, rebuilt SentencePiece-exact where transformers is not.

    transformers 5 rebuilds Llama/Mistral tokenizers (class LlamaTokenizer on the Hub) with
    a pipeline that does not segment as SentencePiece does (benchmarks/bench_mistral_tokenizer.py:
    192 of 425 documents differ). When such a base ships its SentencePiece tokenizer.model,
    it is rebuilt from that file with toolkit.assets.sentencepiece_bpe_to_tokenizers, which
    matches SentencePiece exactly.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from toolkit import assets

    resolved = assets.resolve(name_or_path)
    base = AutoTokenizer.from_pretrained(resolved)
    as_loaded = json.loads(base.backend_tokenizer.to_str())
    if type(base).__name__ not in ("LlamaTokenizer", "LlamaTokenizerFast"):
        model_file = sentencepiece_model_file(resolved) if Path(resolved).is_dir() else None
        return BaseTokenizer(name_or_path, resolved, base, as_loaded, "tokenizer.json", model_file)
    model_file = sentencepiece_model_file(resolved)
    if model_file is None:
        print(f"note: {name_or_path}: using transformers' {type(base).__name__} as loaded", file=sys.stderr)
        return BaseTokenizer(name_or_path, resolved, base, as_loaded, "tokenizer.json")
    from toolkit.assets import sentencepiece_bpe_to_tokenizers

    exact = sentencepiece_bpe_to_tokenizers(model_file)
    rebuilt = PreTrainedTokenizerFast(tokenizer_object=exact, **base.special_tokens_map,
                                      clean_up_tokenization_spaces=False, model_max_length=base.model_max_length)
    if base.chat_template:
        rebuilt.chat_template = base.chat_template
    return BaseTokenizer(name_or_path, resolved, rebuilt, json.loads(exact.to_str()),
                         "tokenizer.model (SentencePiece-exact rebuild)", model_file)


def tokenizer_family(tokenizer_json: dict, name: str) -> str:
    """SENTENCEPIECE or BYTE_LEVEL for a supported base, a clear error otherwise."""
    model = tokenizer_json["model"]
    kind = model.get("type")
    if kind != "BPE":
        raise ExtensionError(
            f"{name}: its tokenizer model is {kind}, not BPE; only BPE tokenizers (SentencePiece-style with byte "
            "fallback, like Llama 2 / Mistral, or byte-level, like GPT-2 / Llama 3 / Qwen) can be extended by "
            "appending merges. Train a new tokenizer instead, or pick a BPE base."
        )
    if _uses_byte_level(tokenizer_json.get("pre_tokenizer")):
        return BYTE_LEVEL
    if model.get("byte_fallback"):
        return SENTENCEPIECE
    raise ExtensionError(
        f"{name}: a BPE tokenizer with neither byte fallback nor a byte-level pre-tokenizer is not lossless "
        "(characters outside its vocabulary become <unk>); extend a byte-fallback or byte-level BPE base."
    )


def _uses_byte_level(pre_tokenizer) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(item) for item in pre_tokenizer.get("pretokenizers", []))


_BYTE_TO_SYMBOL = None


def byte_level_symbols() -> dict:
    """The GPT-2 byte -> printable symbol table that byte-level BPE vocabularies use."""
    global _BYTE_TO_SYMBOL
    if _BYTE_TO_SYMBOL is None:
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
        table, extra = {}, 0
        for byte in range(256):
            if byte in printable:
                table[byte] = chr(byte)
            else:
                table[byte] = chr(256 + extra)
                extra += 1
        _BYTE_TO_SYMBOL = table
    return _BYTE_TO_SYMBOL


def byte_level_text(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for."""
    symbol_to_byte = {symbol: byte for byte, symbol in byte_level_symbols().items()}
    return bytes(symbol_to_byte[symbol] for symbol in token)


def contains_japanese_script(token: str, family: str) -> bool:
    """True for a token with kana, kanji, Japanese punctuation or full-width forms.

    A byte-level token that is only a fragment of multi-byte characters (no ASCII byte,
    no whole character) also counts: Japanese characters are 3 UTF-8 bytes, so their first
    merges build such fragments, and no ASCII text can reach them.
    """
    if family == BYTE_LEVEL:
        raw = byte_level_text(token)
        text = raw.decode("utf-8", errors="ignore")
        if JAPANESE_SCRIPT.search(text):
            return True
        return not text and all(byte >= 0x80 for byte in raw)
    return JAPANESE_SCRIPT.search(token) is not None


# --------------------------------------------------------------------------- training

@dataclass
class TrainedBpe:
    """What a BpeTrainer learned: its tokens in id order and its merges in learned order."""
    tokens: list
    merges: list
    requested_size: int
    seconds: float

    @property
    def exhausted(self) -> bool:
        """The text held no more pairs frequent enough to reach the requested size."""
        return len(self.tokens) < self.requested_size


def training_tokenizer(base_json: dict, family: str) -> Tokenizer:
    """An empty BPE with the base's normaliser and pre-tokenisation, ready to train."""
    tokenizer = Tokenizer(models.BPE())
    base = Tokenizer.from_str(json.dumps(base_json))
    if base.normalizer is not None:
        tokenizer.normalizer = base.normalizer
    if family == BYTE_LEVEL:
        tokenizer.pre_tokenizer = base.pre_tokenizer
    else:
        split = pre_tokenizers.Split(Regex(SENTENCEPIECE_TRAINING_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = (
            split if base.pre_tokenizer is None else pre_tokenizers.Sequence([base.pre_tokenizer, split])
        )
    return tokenizer


def train_bpe(base_json: dict, family: str, texts, vocab_size: int, min_frequency=2, show_progress=True) -> TrainedBpe:
    """Train a BPE of `vocab_size` tokens on `texts` the way the base tokenizer sees text."""
    tokenizer = training_tokenizer(base_json, family)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if family == BYTE_LEVEL else [],
    )
    started = time.perf_counter()
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ", 1)) for pair in model["merges"]]
    return TrainedBpe(tokens, merges, vocab_size, time.perf_counter() - started)


# --------------------------------------------------------------------------- merging

def bpe_segment(symbols, ranks) -> list:
    """BPE as `tokenizers` applies it: merge the lowest-ranked adjacent pair, leftmost first."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best_rank, best_index = None, None
        for index in range(len(symbols) - 1):
            rank = ranks.get((symbols[index], symbols[index + 1]))
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, index
        if best_index is None:
            break
        symbols[best_index:best_index + 2] = [symbols[best_index] + symbols[best_index + 1]]
    return symbols


@dataclass
class MergeResult:
    tokenizer_json: dict
    added_tokens: list = field(default_factory=list)
    added_merges: int = 0
    skipped: dict = field(default_factory=dict)


def base_size(tokenizer_json: dict) -> int:
    """One past the largest id the base uses (vocabulary and added tokens)."""
    ids = list(tokenizer_json["model"]["vocab"].values()) + [token["id"] for token in tokenizer_json["added_tokens"]]
    return max(ids) + 1


def merge_into_base(base_json: dict, family: str, trained: TrainedBpe, max_new_tokens: int,
                    japanese_only=True) -> MergeResult:
    """The base tokenizer with up to `max_new_tokens` of the trained BPE's tokens appended.

    Candidates come in the trained BPE's order (its merges, in the order learned). For each
    one, the merged tokenizer's own segmentation of the token's string is computed: one
    piece -> already reachable, nothing to add; two pieces -> add the token and that one
    merge; more -> a base merge took another path and the token is unreachable, skip it.
    """
    tokenizer_json = json.loads(json.dumps(base_json))
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ", 1)) for pair in model["merges"]]
    ranks = {}
    for rank, pair in enumerate(merges):
        ranks.setdefault(pair, rank)
    specials = {token["content"] for token in tokenizer_json["added_tokens"]}
    next_id = base_size(base_json)
    added, new_merges = [], []
    skipped = {"not_japanese": 0, "already_in_base": 0, "unreachable": 0, "special_token_string": 0}

    def add(token):
        nonlocal next_id
        vocab[token] = next_id
        next_id += 1
        added.append(token)

    def keep(token):
        if token in specials:
            skipped["special_token_string"] += 1
            return False
        if japanese_only and not contains_japanese_script(token, family):
            skipped["not_japanese"] += 1
            return False
        return True

    if family == BYTE_LEVEL:  # bytes the base cannot represent would be lost
        for symbol in byte_level_symbols().values():
            if symbol not in vocab and len(added) < max_new_tokens:
                add(symbol)
    alphabet = [token for token in trained.tokens if len(token) == 1]
    for left, right in trained.merges:
        if len(added) >= max_new_tokens:
            break
        token = left + right
        if not keep(token):
            continue
        if family == SENTENCEPIECE:  # characters the base lacks become tokens before merges use them
            missing = [character for character in dict.fromkeys(token) if character not in vocab]
            if len(added) + len(missing) >= max_new_tokens:
                continue  # no room for its characters and the token; a later candidate may fit
            for character in missing:
                add(character)
        pieces = bpe_segment(token, ranks)
        if len(pieces) == 1:
            skipped["already_in_base"] += 1
            continue
        if len(pieces) > 2:
            skipped["unreachable"] += 1
            continue
        if token in vocab:
            skipped["already_in_base"] += 1  # present but unreachable by base merges: only the merge is new
        else:
            add(token)
        pair = (pieces[0], pieces[1])
        ranks[pair] = len(merges) + len(new_merges)
        new_merges.append(pair)
    if family == SENTENCEPIECE:  # room left: characters no merge used (rare, else byte fallback)
        for character in alphabet:
            if len(added) >= max_new_tokens:
                break
            if character not in vocab and character not in specials and (
                not japanese_only or contains_japanese_script(character, family)
            ):
                add(character)
    list_format = not model["merges"] or isinstance(model["merges"][0], list)
    model["merges"] = model["merges"] + [list(pair) if list_format else " ".join(pair) for pair in new_merges]
    return MergeResult(tokenizer_json, added, len(new_merges), skipped)


def standalone_tokenizer(base_json: dict, family: str, trained: TrainedBpe) -> Tokenizer:
    """The trained BPE on its own, lossless, with the base's special tokens and decoder.

    Vocabulary: the base's special tokens, then (SentencePiece family) the 256 <0xNN> byte
    fallback tokens, then the trained tokens. Used as the "Japanese-only BPE of the same
    size" reference and to check that the merged tokenizer segments as the trained one.
    """
    specials = [token["content"] for token in sorted(base_json["added_tokens"], key=lambda token: token["id"])]
    tokens = list(specials)
    if family == SENTENCEPIECE:
        tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    tokens += [token for token in trained.tokens if token not in set(tokens)]
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = base_json["model"].get("unk_token")
    model = models.BPE(vocab=vocab, merges=list(trained.merges), unk_token=unk,
                       byte_fallback=family == SENTENCEPIECE, fuse_unk=family == SENTENCEPIECE)
    tokenizer = training_tokenizer(base_json, family)
    tokenizer.model = model
    base = Tokenizer.from_str(json.dumps(base_json))
    tokenizer.decoder = base.decoder
    tokenizer.add_special_tokens(specials)
    return tokenizer


def standalone_training_size(base_json: dict, family: str, total: int) -> int:
    """The BpeTrainer size that makes standalone_tokenizer() hold `total` tokens."""
    return total - len(base_json["added_tokens"]) - (256 if family == SENTENCEPIECE else 0)


# --------------------------------------------------------------------------- tokenizer.model

def extended_sentencepiece_model(base_model_file, tokenizer_json: dict) -> bytes:
    """The base's SentencePiece model (tokenizer.model) with the extension's new pieces appended.

    llama.cpp's converter and sentencepiece itself read this file, not tokenizer.json, for
    Llama/Mistral-family models. SentencePiece BPE merges the adjacent pair whose result has
    the highest score, so the new pieces get scores below every base score (base merges,
    whitespace runs included, keep priority) and decreasing in the order of their merges in
    tokenizer.json; a piece without a merge (a new single character) comes last. Base pieces,
    scores, types, the normaliser and byte fallback are copied unchanged.
    """
    import numpy
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(base_model_file).read_bytes())
    vocab = tokenizer_json["model"]["vocab"]
    specials = {token["content"]: token["id"] for token in tokenizer_json["added_tokens"]}
    moved = [piece.piece for index, piece in enumerate(proto.pieces)
             if vocab.get(piece.piece, specials.get(piece.piece)) != index]
    if moved:
        raise ExtensionError(
            f"{base_model_file}: {len(moved)} of its pieces (e.g. {moved[0]!r}) have another id in tokenizer.json, so "
            "it is not the SentencePiece model of this base; pass a base whose tokenizer.model and tokenizer.json agree"
        )
    if not proto.trainer_spec.byte_fallback:
        raise ExtensionError(f"{base_model_file}: byte_fallback is off; the extension needs a byte-fallback base")
    new_tokens = sorted((index, token) for token, index in vocab.items() if index >= len(proto.pieces))
    if [index for index, _ in new_tokens] != list(range(len(proto.pieces), len(proto.pieces) + len(new_tokens))):
        raise ExtensionError("tokenizer.json: the new token ids are not contiguous after the base's; not an extension")
    merge_rank = {}
    for rank, pair in enumerate(tokenizer_json["model"]["merges"]):
        left, right = pair if isinstance(pair, list) else pair.split(" ", 1)
        merge_rank.setdefault(left + right, rank)
    by_priority = sorted(new_tokens, key=lambda item: (merge_rank.get(item[1], math.inf), item[0]))
    score = numpy.float32(min(piece.score for piece in proto.pieces))
    scores = {}
    for _, token in by_priority:  # float32 steps: -1e9 - 1 is -1e9 in float32, one ulp below is not
        score = numpy.nextafter(score, numpy.float32(-numpy.inf))
        scores[token] = float(score)
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    for _, token in new_tokens:
        proto.pieces.add(piece=token, score=scores[token], type=normal)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


def write_gguf_vocabulary(tokenizer_dir, gguf_path, architecture="llama"):
    """A vocabulary-only GGUF of a SentencePiece tokenizer folder, as llama.cpp's converter builds it.

    Follows `convert_hf_to_gguf.py`'s `_set_vocab_sentencepiece` with the `gguf` package:
    pieces, scores and types from tokenizer.model (`gguf.SentencePieceVocab`), then BOS/EOS/UNK
    and add_bos from the folder's configs (`gguf.SpecialVocab`). llama.cpp loads it with
    `vocab_only=True`, so its tokenisation can be compared with ours without model weights.
    """
    import gguf

    vocabulary = gguf.SentencePieceVocab(Path(tokenizer_dir))
    tokens, scores, types = zip(*vocabulary.all_tokens())
    writer = gguf.GGUFWriter(str(gguf_path), architecture)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(Path(tokenizer_dir), n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(gguf_path)
