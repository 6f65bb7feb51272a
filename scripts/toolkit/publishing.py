"""Checks of a model folder before it is published, shared by scripts/publish.py and its benchmark.

    classify_files(folder, ignore_patterns)   model files to upload / run records kept local; refuses the rest
    check_weights(folder, files, config)      safetensors (+ index) hold exactly what the config builds
    check_tokenizer_and_generation(...)       tokenizer loads and fits vocab_size; generation EOS = tokenizer EOS
    check_repo_id(repo_id)                    ORG/NAME, valid for the Hub
    verify_remote(files, local, remote)       what arrived on the Hub matches sizes and LFS sha256s

Each problem raises `PublishError` naming the file and what to do.
"""

import fnmatch
import hashlib
import json
import sys
from pathlib import Path


class PublishError(ValueError):
    """A problem with the inputs, with what to do about it."""


# Files a transformers causal-LM folder consists of: these are uploaded.
MODEL_FILES = [
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "README.md", ".gitattributes", "LICENSE",
]
# Records of the run that belong next to the model but not in the model repo: kept local, listed.
RUN_RECORDS = [
    "*_report.json", "*_results.json", "trainer_state.json", "*.png", "*.log", "*.jsonl", "*.md", "*.csv",
    "runs/*", "logs/*",
    "tensorboard/*", "*events.out.tfevents.*",
]
# Never published: training state and pickles. (pattern, why)
REFUSED = [
    ("*optimizer*", "optimizer state"), ("*scheduler*.pt", "scheduler state"), ("*rng_state*", "RNG state"),
    ("*random_states*", "RNG state"), ("checkpoint*/*", "training checkpoint"), ("checkpoints/*", "training checkpoint"),
    ("step_*/*", "training checkpoint"), ("epoch_*/*", "training checkpoint"), ("global_step*", "DeepSpeed checkpoint"),
    ("latest", "DeepSpeed checkpoint pointer"), ("zero_to_fp32.py", "DeepSpeed checkpoint helper"),
    ("*.bin", "pickle weights (publish safetensors)"), ("*.pt", "pickle file"), ("*.pth", "pickle file"),
    ("*.pkl", "pickle file"), ("*.ckpt", "checkpoint file"),
]


def matches(path, patterns):
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def classify_files(model_dir: Path, ignore_patterns):
    """(to_upload, left_out {path: why}); raises on refused or unknown files."""
    to_upload, left_out, refused = [], {}, []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(model_dir).as_posix()
        if matches(relative, ignore_patterns):
            left_out[relative] = "--ignore_patterns"
        elif "/" not in relative and matches(relative, MODEL_FILES):
            to_upload.append(relative)
        elif relative == "publish_report.json" or matches(relative, RUN_RECORDS):
            left_out[relative] = "run record, kept local"
        else:
            why = next((why for pattern, why in REFUSED if fnmatch.fnmatch(relative, pattern)), "not a model file")
            refused.append(f"{relative} ({why})")
    if refused:
        raise PublishError(
            f"{model_dir}: refusing to publish {len(refused)} file(s) that do not belong in a model repo:\n  "
            + "\n  ".join(refused[:20]) + ("\n  ..." if len(refused) > 20 else "")
            + "\nMove them out of the folder, or leave them out explicitly with --ignore_patterns 'GLOB' ..."
        )
    return to_upload, left_out


def check_weights(model_dir: Path, files, config):
    """Safetensors files (+ index) complete and consistent with the config; returns a summary."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    shards = [f for f in files if f.endswith(".safetensors")]
    if not shards:
        stray = sorted(p.name for p in model_dir.glob("*.bin"))
        raise PublishError(f"{model_dir}: no safetensors weights (model.safetensors or model-*-of-*.safetensors)"
                           + (f"; found pickle weights {stray}: re-save with save_pretrained(safe_serialization=True)" if stray else
                              "; did training finish and save the model?"))
    index_path = model_dir / "model.safetensors.index.json"
    tensors = {}  # name -> (shape, file)
    for shard in shards:
        try:
            with safe_open(str(model_dir / shard), framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = (tuple(handle.get_slice(name).get_shape()), shard)
        except Exception as error:  # safetensors raises its own error types
            raise PublishError(f"{model_dir / shard}: not a readable safetensors file ({error})") from error
    if index_path.exists():
        weight_map = json.loads(index_path.read_text()).get("weight_map") or {}
        missing_files = sorted(set(weight_map.values()) - set(shards))
        if missing_files:
            raise PublishError(f"{index_path}: names shard(s) {missing_files} that are not in the folder")
        unlisted = sorted(set(shards) - set(weight_map.values()))
        if unlisted:
            raise PublishError(f"{index_path}: shard(s) {unlisted} are in the folder but not in the index; remove them")
        wrong = sorted(name for name, shard in weight_map.items() if tensors.get(name, (None, None))[1] != shard)
        if wrong:
            raise PublishError(f"{index_path}: {len(wrong)} tensor(s) are not in the shard the index names, e.g. {wrong[0]}")
    elif len(shards) > 1 or shards[0] != "model.safetensors":
        raise PublishError(f"{model_dir}: sharded weights {shards} but no model.safetensors.index.json")

    vocab_size = getattr(config, "vocab_size", None)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # unknown architecture: fall back to the embedding check only
        print(f"note: cannot build {config.model_type} from its config ({error}); checking embeddings only", file=sys.stderr)
        model = None
    if model is not None:
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings", False) else set()
        missing = sorted(set(expected) - set(tensors) - tied)
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise PublishError(
                f"{model_dir}: the weights do not match config.json ({config.model_type}): "
                f"{len(missing)} tensor(s) missing{' e.g. ' + missing[0] if missing else ''}, "
                f"{len(unexpected)} unexpected{' e.g. ' + unexpected[0] if unexpected else ''}"
            )
        for name, shape in expected.items():
            if name in tensors and tensors[name][0] != shape:
                raise PublishError(
                    f"{model_dir / tensors[name][1]}: tensor {name} has shape {list(tensors[name][0])} but config.json "
                    f"(vocab_size={vocab_size}, hidden_size={getattr(config, 'hidden_size', '?')}) implies {list(shape)}; "
                    "was config.json saved after resizing the embeddings?"
                )
    else:
        for name, (shape, shard) in tensors.items():
            if any(key in name for key in ("embed_tokens", "wte", "lm_head")) and vocab_size and shape[0] != vocab_size:
                raise PublishError(f"{model_dir / shard}: {name} has {shape[0]} rows but config.json says vocab_size={vocab_size}")
    return {"files": shards, "tensors": len(tensors), "sharded": index_path.exists(),
            "parameters": sum(_product(shape) for shape, _ in tensors.values())}


def _product(shape):
    total = 1
    for size in shape:
        total *= size
    return total


def check_tokenizer_and_generation(model_dir: Path, config, max_vocab_padding):
    from transformers import AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:
        raise PublishError(f"{model_dir}: the tokenizer does not load ({type(error).__name__}: {error}); "
                           "save it into the model folder with tokenizer.save_pretrained") from error
    size, vocab_size = len(tokenizer), config.vocab_size
    if size > vocab_size:
        raise PublishError(f"{model_dir}: vocabulary mismatch: the tokenizer has {size:,} tokens but config.json "
                           f"vocab_size is {vocab_size:,}; ids >= {vocab_size:,} would index past the embeddings. "
                           "Is this the extended tokenizer saved with the base model?")
    if vocab_size - size > max_vocab_padding:
        raise PublishError(f"{model_dir}: vocabulary mismatch: config.json vocab_size is {vocab_size:,} but the "
                           f"tokenizer has only {size:,} tokens ({vocab_size - size:,} unused rows > --max_vocab_padding "
                           f"{max_vocab_padding}). Is this the base tokenizer saved with the extended model?")
    if not (model_dir / "generation_config.json").exists():
        raise PublishError(f"{model_dir}: no generation_config.json; save one with model.generation_config.save_pretrained "
                           "(its eos_token_id tells generate() when to stop)")
    generation = GenerationConfig.from_pretrained(model_dir)
    eos = generation.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        raise PublishError(f"{model_dir}/generation_config.json: eos_token_id={eos} but the tokenizer's EOS "
                           f"{tokenizer.eos_token!r} is id {tokenizer.eos_token_id}; generation would not stop at it")
    return {"tokenizer_class": type(tokenizer).__name__, "tokenizer_length": size, "vocab_size": vocab_size,
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id}


def check_repo_id(repo_id):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"--repo_id {repo_id!r} is not a valid Hub repo id: {error}") from error
    if repo_id.count("/") != 1:
        raise PublishError(f"--repo_id {repo_id!r}: give it as ORG/NAME (your user name or organisation, a slash, the model name)")


def sha256_of(path: Path, progress) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
            progress.update(len(block))
    return digest.hexdigest()


def human_size(size):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024


def verify_remote(files, local, remote):
    """Every uploaded file present with the same size (and sha256 for LFS files)."""
    problems = []
    for name in files:
        item = remote.get(name)
        if item is None:
            problems.append(f"{name}: missing")
        elif item.size != local[name]["size"]:
            problems.append(f"{name}: {item.size} bytes remote, {local[name]['size']} local")
        elif item.lfs is not None and item.lfs.sha256 != local[name]["sha256"]:
            problems.append(f"{name}: sha256 differs")
    if problems:
        raise PublishError("the upload did not arrive intact: " + "; ".join(problems))
