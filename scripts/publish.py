#!/usr/bin/env python
"""Publish a trained model folder to the Hugging Face Hub with a bilingual (EN/JA) model card.

    python scripts/publish.py --model_dir OUT/pretrain --repo_id ORG/NAME --reports OUT [--dry_run]

1. Renders README.md (Apache-2.0, English then Japanese) into the model folder from the
   stages' JSON reports (see scripts/toolkit/model_card.py) and validates its metadata with
   huggingface_hub's ModelCard / ModelCardData.
2. Checks the folder: config, safetensors weights (+ index when sharded) whose tensors match
   what the config builds (embedding rows = vocab_size), a tokenizer that loads and fits the
   vocabulary, a generation config whose EOS is the tokenizer's. Refuses optimizer states,
   checkpoints, pickles and any other stray file (leave them out with --ignore_patterns).
3. --dry_run: lists every file that would be uploaded, with size and sha256, in
   publish_report.json. Otherwise creates the repo and uploads with `upload_folder` (in
   huggingface_hub 2.4 it also replaces `upload_large_folder`: with hf_xet installed it streams
   big folders in several resumable commits), prints the URL and checks what arrived.

The token comes from HF_TOKEN or the login cache (`hf auth login`); it is never printed,
logged, or written to the report or the card.
"""

import fnmatch
import glob
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser

from toolkit import model_card
from toolkit.reports import write_json_atomic


@dataclass
class PublishArguments:
    model_dir: str = field(metadata={"help": "The model folder to publish (save_pretrained output)."})
    repo_id: str = field(metadata={"help": "Hub repository, ORG/NAME."})
    reports: str = field(default=None, metadata={"help": "Folder with the stage reports (searched recursively); the model folder is searched too."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str = field(default=None, metadata={"help": "Branch to upload to (created if missing). Default: main."})
    dry_run: bool = field(default=False, metadata={"help": "Render and check, list every file with size and sha256; upload nothing."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing to the branch."})
    overwrite: bool = field(default=False, metadata={"help": "Allow committing to a repo that already has files; remote files not in this upload are deleted."})
    card_config: str = field(default=None, metadata={"help": "YAML with card fields (see model_card/defaults.yaml)."})
    model_name: str = field(default=None, metadata={"help": "Card title (default: the repo name)."})
    authors: list[str] = field(default_factory=list, metadata={"help": "Authors named in the card."})
    sponsor: str = field(default=None, metadata={"help": "Compute sponsor line for the card."})
    hardware_description: str = field(default=None, metadata={"help": "Hardware line for the card (overrides the training report's)."})
    acknowledgements: list[str] = field(default_factory=list, metadata={"help": "Extra acknowledgement lines (replace the defaults)."})
    base_model: str = field(default=None, metadata={"help": "Hub id of the base model for the card metadata."})
    ignore_patterns: list[str] = field(default_factory=list, metadata={"help": "Globs of files in the model folder to leave out of the upload (e.g. 'checkpoints/*')."})
    max_vocab_padding: int = field(default=128, metadata={"help": "Most embedding rows allowed beyond the tokenizer's length."})
    output_dir: str = field(default=None, metadata={"help": "Where publish_report.json goes (default: the model folder)."})


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


# ----------------------------------------------------------------------------- folder checks
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


# ----------------------------------------------------------------------------- the card
def write_card(args, model_dir: Path):
    from huggingface_hub import ModelCard

    roots = [args.reports, str(model_dir)] if args.reports else [str(model_dir)]
    if args.reports and not Path(args.reports).is_dir():
        raise PublishError(f"--reports {args.reports}: no such folder")
    paths = model_card.find_reports(roots)
    facts = model_card.collect_facts(model_card.load_reports(paths))
    overrides = {"model_name": args.model_name, "authors": args.authors, "sponsor": args.sponsor,
                 "hardware_description": args.hardware_description, "acknowledgements": args.acknowledgements,
                 "base_model": args.base_model}
    config = model_card.load_card_config(args.card_config, overrides)
    text = model_card.render_card(facts, config, args.repo_id)
    card = ModelCard(text)  # parses the front matter into ModelCardData
    data = card.data
    problems = [f"{key}={getattr(data, key)!r}" for key, want in
                (("license", config.license), ("library_name", "transformers"), ("pipeline_tag", "text-generation"))
                if getattr(data, key) != want]
    if data.language != ["en", "ja"] or "<!-- lang: ja -->" not in card.text:
        problems.append(f"language={data.language!r}")
    if problems:
        raise PublishError(f"the rendered card's metadata is not as intended: {', '.join(problems)}")
    temporary = model_dir / ".README.md.tmp"
    temporary.write_text(str(card), encoding="utf-8")
    os.replace(temporary, model_dir / "README.md")  # atomic: never a half-written card
    return {"path": str(model_dir / "README.md"), "reports": {k: str(v) for k, v in paths.items()},
            "sections_left_out": [stage for stage, value in facts.items() if value is None],
            "metadata": data.to_dict()}


# ----------------------------------------------------------------------------- upload
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


def upload(args, model_dir: Path, files, commit_message, commit_description):
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set: unset it to upload, or pass --dry_run")
    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(token=token)
    try:
        existing = api.list_repo_files(args.repo_id, revision=args.revision)
    except RepositoryNotFoundError:
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=False)
        print(f"created {'private' if args.private else 'public'} repo {url}")
        existing = []
        if args.revision:
            api.create_branch(args.repo_id, branch=args.revision)
    except RevisionNotFoundError:
        api.create_branch(args.repo_id, branch=args.revision)
        print(f"created branch {args.revision} in {args.repo_id}")
        existing = []
    occupied = [name for name in existing if name != ".gitattributes"]
    if occupied and not (args.create_pr or args.overwrite):
        raise PublishError(
            f"{args.repo_id}{'@' + args.revision if args.revision else ''} already has {len(occupied)} file(s) "
            f"({', '.join(occupied[:5])}{', ...' if len(occupied) > 5 else ''}); pass --create_pr to propose this "
            "upload as a pull request, or --overwrite to replace the repo's content"
        )
    info = api.upload_folder(
        repo_id=args.repo_id, folder_path=model_dir, allow_patterns=[glob.escape(name) for name in files],
        commit_message=commit_message, commit_description=commit_description, revision=args.revision,
        create_pr=args.create_pr, delete_patterns="*" if args.overwrite and occupied else None,
    )
    remote = {item.path: item for item in api.list_repo_tree(args.repo_id, revision=info.oid, recursive=True)
              if hasattr(item, "size")}
    return info, remote


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


# ----------------------------------------------------------------------------- main
def publish(args):
    from transformers import AutoConfig

    started = time.time()
    check_repo_id(args.repo_id)
    if args.create_pr and args.revision:
        raise PublishError("--create_pr opens a pull request against main; do not combine it with --revision")
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise PublishError(f"--model_dir {model_dir}: no such folder")
    if not (model_dir / "config.json").exists():
        raise PublishError(f"{model_dir}: no config.json, so not a transformers model folder (did training finish?)")
    config = AutoConfig.from_pretrained(model_dir)
    card = write_card(args, model_dir)  # README.md first: it is one of the files checked and uploaded
    files, left_out = classify_files(model_dir, args.ignore_patterns)
    weights = check_weights(model_dir, files, config)
    tokenizer = check_tokenizer_and_generation(model_dir, config, args.max_vocab_padding)
    print(f"card: {card['path']} (sections left out for lack of a report: {', '.join(card['sections_left_out']) or 'none'})")
    print(f"checked: {weights['tensors']} tensors, {weights['parameters']:,} parameters in {len(weights['files'])} "
          f"safetensors file(s); tokenizer {tokenizer['tokenizer_length']:,} tokens, vocab_size {tokenizer['vocab_size']:,}")

    total = sum((model_dir / name).stat().st_size for name in files)
    local = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", disable=None) as progress:
        for name in files:
            path = model_dir / name
            local[name] = {"size": path.stat().st_size, "sha256": sha256_of(path, progress)}
    print(f"\n{'file':<40} {'size':>10}  sha256")
    for name in files:
        print(f"{name:<40} {human_size(local[name]['size']):>10}  {local[name]['sha256']}")
    print(f"{len(files)} files, {human_size(total)}" + (f"; left out: {', '.join(sorted(left_out))}" if left_out else ""))

    commit_message = f"Upload {card['metadata'].get('model_name') or args.repo_id}: weights, tokenizer and bilingual model card"
    commit_description = (
        f"{len(files)} files, {human_size(total)}, {weights['parameters']:,} parameters, vocabulary {tokenizer['vocab_size']:,}.\n"
        f"Card rendered by scripts/publish.py from: {', '.join(Path(p).name for p in card['reports'].values()) or 'no reports'}."
    )
    report = {
        "repo_id": args.repo_id, "revision": args.revision, "private": args.private, "dry_run": args.dry_run,
        "create_pr": args.create_pr, "overwrite": args.overwrite, "model_dir": str(model_dir),
        "files": [{"path": name, **local[name]} for name in files], "total_bytes": total,
        "left_out": left_out, "card": card, "weights": weights, "tokenizer": tokenizer,
        "commit_message": commit_message, "uploaded": False,
    }
    if not args.dry_run:
        info, remote = upload(args, model_dir, files, commit_message, commit_description)
        verify_remote(files, local, remote)
        report.update(uploaded=True, commit_url=info.commit_url, commit_oid=info.oid, pr_url=info.pr_url,
                      repo_url=str(info.repo_url))
        print(f"\nuploaded and verified {len(files)} files: {info.repo_url}")
        print(f"commit: {info.commit_url}" + (f"\npull request: {info.pr_url}" if info.pr_url else ""))
    else:
        print("\ndry run: nothing uploaded")
    report["seconds"] = round(time.time() - started, 2)
    report_path = write_json_atomic(Path(args.output_dir or model_dir) / "publish_report.json", report)
    print(f"report: {report_path}")
    return report


def main():
    (args,) = HfArgumentParser(PublishArguments).parse_args_into_dataclasses()
    from huggingface_hub import get_token

    token = get_token() if not args.dry_run else None
    try:
        publish(args)
    except Exception as error:  # the token must not leak through any error message
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(error, PublishError):
            message = str(error)
        elif isinstance(error, HfHubHTTPError):  # the Hub said no: its message is the useful part
            status = error.response.status_code if error.response is not None else None
            hint = " (is the token valid, with write access to this namespace?)" if status in (401, 403) else ""
            message = f"the Hub refused: {error}{hint}"
        else:
            message = traceback.format_exc()
        if token:
            message = message.replace(token, "***")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
