"""Checks of a model folder before it is published, shared by scripts/publish.py and its benchmark.

    classify_files(folder, ignore_patterns, problems)  model files to upload / run records kept local; refuses the rest
    check_weights(folder, files, config, problems)     safetensors (+ index) hold exactly what the config builds
    check_tokenizer_and_generation(..., problems)      tokenizer loads and fits vocab_size; generation EOS = tokenizer EOS
    check_card_against_model(facts, ..., problems)     the card's vocabulary, parameters and base model are this model's
    check_existing_card(folder, card, overwrite, problems)  a README.md already there is never replaced silently
    check_repo_id(repo_id)                             ORG/NAME, valid for the Hub
    verify_remote(files, local, remote)                what arrived on the Hub matches sizes and LFS sha256s

The checks append every problem they find (naming the file and what to do) to `problems`,
so one run reports all of them; `raise_problems` turns the list into one `PublishError`.
"""

import fnmatch
import json
import sys
from pathlib import Path


class PublishError(ValueError):
    """A problem with the inputs, with what to do about it."""


def raise_problems(problems, model_dir):
    """One PublishError listing every problem found, numbered; nothing when there are none."""
    if problems:
        listed = "\n".join(f"  {number}. {problem}" for number, problem in enumerate(problems, 1))
        raise PublishError(f"{model_dir}: {len(problems)} problem(s), nothing was published:\n{listed}")


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


def classify_files(model_dir: Path, ignore_patterns, problems):
    """(to_upload, left_out {path: why}); refused or unknown files are a problem."""
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
        problems.append(
            f"refusing to publish {len(refused)} file(s) that do not belong in a model repo:\n  "
            + "\n  ".join(refused[:20]) + ("\n  ..." if len(refused) > 20 else "")
            + "\nMove them out of the folder, or leave them out explicitly with --ignore_patterns 'GLOB' ..."
        )
    return to_upload, left_out


def check_weights(model_dir: Path, files, config, problems):
    """Safetensors files (+ index) complete and consistent with the config; a summary (None: no weights)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    shards = [f for f in files if f.endswith(".safetensors")]
    if not shards:
        stray = sorted(p.name for p in model_dir.glob("*.bin"))
        problems.append(f"{model_dir}: no safetensors weights (model.safetensors or model-*-of-*.safetensors)"
                        + (f"; found pickle weights {stray}: re-save with save_pretrained(safe_serialization=True)" if stray
                           else "; did training finish and save the model?"))
        return None
    index_path = model_dir / "model.safetensors.index.json"
    tensors = {}  # name -> (shape, file)
    for shard in shards:
        try:
            with safe_open(str(model_dir / shard), framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = (tuple(handle.get_slice(name).get_shape()), shard)
        except Exception as error:  # safetensors raises its own error types
            problems.append(f"{model_dir / shard}: not a readable safetensors file ({error})")
    if index_path.exists():
        weight_map = json.loads(index_path.read_text()).get("weight_map") or {}
        missing_files = sorted(set(weight_map.values()) - set(shards))
        if missing_files:
            problems.append(f"{index_path}: names shard(s) {missing_files} that are not in the folder")
        unlisted = sorted(set(shards) - set(weight_map.values()))
        if unlisted:
            problems.append(f"{index_path}: shard(s) {unlisted} are in the folder but not in the index; remove them")
        wrong = sorted(name for name, shard in weight_map.items() if tensors.get(name, (None, None))[1] != shard)
        if wrong:
            problems.append(f"{index_path}: {len(wrong)} tensor(s) are not in the shard the index names, e.g. {wrong[0]}")
    elif len(shards) > 1 or shards[0] != "model.safetensors":
        problems.append(f"{model_dir}: sharded weights {shards} but no model.safetensors.index.json")

    vocab_size = getattr(config, "vocab_size", None)
    tied = set()
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
            problems.append(
                f"{model_dir}: the weights do not match config.json ({config.model_type}): "
                f"{len(missing)} tensor(s) missing{' e.g. ' + missing[0] if missing else ''}, "
                f"{len(unexpected)} unexpected{' e.g. ' + unexpected[0] if unexpected else ''}"
            )
        for name, shape in expected.items():
            if name in tensors and tensors[name][0] != shape:
                problems.append(
                    f"{model_dir / tensors[name][1]}: tensor {name} has shape {list(tensors[name][0])} but config.json "
                    f"(vocab_size={vocab_size}, hidden_size={getattr(config, 'hidden_size', '?')}) implies {list(shape)}; "
                    "was config.json saved after resizing the embeddings?"
                )
    else:
        for name, (shape, shard) in tensors.items():
            if any(key in name for key in ("embed_tokens", "wte", "lm_head")) and vocab_size and shape[0] != vocab_size:
                problems.append(f"{model_dir / shard}: {name} has {shape[0]} rows but config.json says vocab_size={vocab_size}")
    # Parameters as the model has them (model.num_parameters()): a tied output matrix that the
    # file also stores (DeepSpeed's 16-bit save does) counts once, as in training_report.json.
    return {"files": shards, "tensors": len(tensors), "sharded": index_path.exists(),
            "parameters": sum(_product(shape) for name, (shape, _) in tensors.items() if name not in tied),
            "stored_parameters": sum(_product(shape) for shape, _ in tensors.values())}


def _product(shape):
    total = 1
    for size in shape:
        total *= size
    return total


def check_tokenizer_and_generation(model_dir: Path, config, max_vocab_padding, problems):
    """The tokenizer loads and fits vocab_size; generation stops at its EOS. A summary (None: no tokenizer)."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:
        problems.append(f"{model_dir}: the tokenizer does not load ({type(error).__name__}: {error}); "
                        "save it into the model folder with tokenizer.save_pretrained")
        return None
    size, vocab_size = len(tokenizer), config.vocab_size
    if size > vocab_size:
        problems.append(f"{model_dir}: vocabulary mismatch: the tokenizer has {size:,} tokens but config.json "
                        f"vocab_size is {vocab_size:,}; ids >= {vocab_size:,} would index past the embeddings. "
                        "Is this the extended tokenizer saved with the base model?")
    elif vocab_size - size > max_vocab_padding:
        problems.append(f"{model_dir}: vocabulary mismatch: config.json vocab_size is {vocab_size:,} but the "
                        f"tokenizer has only {size:,} tokens ({vocab_size - size:,} unused rows > --max_vocab_padding "
                        f"{max_vocab_padding}). Is this the base tokenizer saved with the extended model?")
    if not (model_dir / "generation_config.json").exists():
        problems.append(f"{model_dir}: no generation_config.json; save one with model.generation_config.save_pretrained "
                        "(its eos_token_id tells generate() when to stop)")
    else:
        generation = GenerationConfig.from_pretrained(model_dir)
        eos = generation.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
            problems.append(f"{model_dir}/generation_config.json: eos_token_id={eos} but the tokenizer's EOS "
                            f"{tokenizer.eos_token!r} is id {tokenizer.eos_token_id}; generation would not stop at it")
    return {"tokenizer_class": type(tokenizer).__name__, "tokenizer_length": size, "vocab_size": vocab_size,
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id}


ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def base_model_config(name):
    """The config.json of a base model named on the card, if it can be read offline; else None."""
    from transformers import AutoConfig

    from toolkit import assets
    from toolkit.model_card import OFFLINE_BASE_MODELS

    offline_copy = {hub_id: name for name, hub_id in OFFLINE_BASE_MODELS.items()}.get(name)
    for candidate in [name] + ([offline_copy] if offline_copy else []):
        try:
            return AutoConfig.from_pretrained(assets.resolve(candidate)).to_dict()
        except Exception:  # a Hub id not in the local cache while offline, a gated repo, ...: not checkable here
            continue
    return None


def check_card_against_model(facts, config, weights, tokenizer, problems, base_model=None):
    """The card's figures (vocabulary, parameters, base model) must be this model's.

    Reports from another run (a --reports folder of a different experiment) would otherwise
    publish a card describing another model. `base_model` is the base the card's metadata
    names (default: the training report's). Returns what was compared, for the report.
    """
    compared = {}
    card_vocabulary = (facts.get("tokenizer") or {}).get("final_vocab_size")
    if card_vocabulary is not None and tokenizer is not None:
        compared["vocabulary"] = {"card": card_vocabulary, "model": tokenizer["tokenizer_length"]}
        if card_vocabulary != tokenizer["tokenizer_length"]:
            problems.append(f"the card would say the tokenizer has {card_vocabulary:,.0f} tokens (tokenizer_report.json) "
                            f"but the model folder's tokenizer has {tokenizer['tokenizer_length']:,}: are --reports from "
                            "another run?")
    training = facts.get("training") or {}
    card_parameters = training.get("parameters")
    if card_parameters is not None and weights is not None:
        compared["parameters"] = {"card": card_parameters, "model": weights["parameters"]}
        if card_parameters != weights["parameters"]:
            problems.append(f"the card would say {card_parameters:,.0f} parameters (training_report.json) but the "
                            f"weights hold {weights['parameters']:,}: are --reports from another run?")
    base = base_model or training.get("base_model")
    source = "the card's base_model" if base_model else "training_report.json"
    if base:
        base_config = base_model_config(base)
        model_config = config.to_dict()
        if base_config is None:
            compared["base_model"] = {"card": base, "checked": False}
        else:
            differ = [f"{key} {base_config.get(key)} vs {model_config.get(key)}" for key in ARCHITECTURE_KEYS
                      if base_config.get(key) != model_config.get(key)]
            compared["base_model"] = {"card": base, "checked": True, "architecture_differs": differ}
            if differ:
                problems.append(f"the card names {base} as the base model ({source}), but config.json is "
                                f"not that architecture ({'; '.join(differ)}): are --reports from another run?")
    return compared


def check_existing_card(model_dir: Path, card_text: str, overwrite_card: bool, problems):
    """A README.md already in the folder is replaced only with --overwrite_card (unless identical)."""
    existing = model_dir / "README.md"
    if existing.exists() and not overwrite_card and existing.read_text(encoding="utf-8") != card_text:
        problems.append(f"{existing} exists and differs from the rendered card (a hand-written card?); it is never "
                        "replaced silently: pass --overwrite_card to replace it, or move it away")


def check_repo_id(repo_id):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"--repo_id {repo_id!r} is not a valid Hub repo id: {error}") from error
    if repo_id.count("/") != 1:
        raise PublishError(f"--repo_id {repo_id!r}: give it as ORG/NAME (your user name or organisation, a slash, the model name)")


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
