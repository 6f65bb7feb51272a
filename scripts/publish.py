#!/usr/bin/env python
"""Publish a trained model folder to the Hugging Face Hub with a bilingual (EN/JA) model card.

    python scripts/publish.py --model_dir OUT/pretrain --repo_id ORG/NAME --reports OUT [--dry_run]

1. Renders the card (Apache-2.0, English then Japanese) from the stages' JSON reports (see
   scripts/toolkit/model_card.py) into a temporary folder and validates its metadata with
   huggingface_hub's ModelCard / ModelCardData. The model folder is not touched.
2. Checks the folder: config, safetensors weights (+ index when sharded) whose tensors match
   what the config builds (embedding rows = vocab_size), a tokenizer that loads and fits the
   vocabulary, a generation config whose EOS is the tokenizer's. Refuses optimizer states,
   checkpoints, pickles and any other stray file (leave them out with --ignore_patterns).
   Checks the card against the model: its vocabulary, parameter count and base model
   (architecture) must be this folder's, so reports from another run cannot describe it.
   A README.md already in the folder is never replaced without --overwrite_card.
   Every problem is collected and all of them are reported together.
3. --dry_run: lists every file that would be uploaded, with size and sha256, in
   publish_report.json, and leaves the rendered card next to it as README.preview.md.
   Otherwise writes README.md into the folder (atomically), creates the repo and uploads
   with `upload_folder` (in huggingface_hub 2.4 it also replaces `upload_large_folder`: with
   hf_xet installed it streams big folders in several resumable commits), prints the URL
   and checks what arrived.

The token comes from HF_TOKEN or the login cache (`hf auth login`); it is never printed,
logged, or written to the report or the card.
"""

import glob
import hashlib
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser

from toolkit import model_card
from toolkit.publishing import (
    PublishError,
    check_card_against_model,
    check_existing_card,
    check_repo_id,
    check_tokenizer_and_generation,
    check_weights,
    classify_files,
    human_size,
    raise_problems,
    verify_remote,
)
from toolkit.reports import sha256_of, write_json_atomic
from toolkit.quiet import quiet_by_default


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
    overwrite_card: bool = field(default=False, metadata={"help": "Replace a README.md already in the model folder with the rendered card."})
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


# ----------------------------------------------------------------------------- the card
def build_card(args, scratch_dir):
    if args.reports and not Path(args.reports).is_dir():
        raise PublishError(f"--reports {args.reports}: no such folder")
    overrides = {"model_name": args.model_name, "authors": args.authors, "sponsor": args.sponsor,
                 "hardware_description": args.hardware_description, "acknowledgements": args.acknowledgements,
                 "base_model": args.base_model}
    config = model_card.load_card_config(args.card_config, overrides)
    return model_card.build_card(args.repo_id, [args.reports, args.model_dir], config, scratch_dir)


def write_text_atomic(path: Path, text: str):
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)  # never a half-written card


# ----------------------------------------------------------------------------- upload
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

    # Render into a temporary folder and check everything, collecting every problem.
    problems = []
    with tempfile.TemporaryDirectory(prefix="publish-card-") as scratch:
        card = build_card(args, scratch)
    card_text = card.pop("text")
    card.pop("rendered_at")  # the temporary folder is gone
    files, left_out = classify_files(model_dir, args.ignore_patterns, problems)
    weights = check_weights(model_dir, files, config, problems)
    tokenizer = check_tokenizer_and_generation(model_dir, config, args.max_vocab_padding, problems)
    card["checked_against_model"] = check_card_against_model(
        card.pop("facts"), config, weights, tokenizer, problems, base_model=card["metadata"].get("base_model"))
    check_existing_card(model_dir, card_text, args.overwrite_card, problems)
    report_dir = Path(args.output_dir or model_dir)
    if problems:
        write_json_atomic(report_dir / "publish_report.json",
                          {"repo_id": args.repo_id, "model_dir": str(model_dir), "dry_run": args.dry_run,
                           "problems": problems, "uploaded": False})
        raise_problems(problems, model_dir)
    print(f"card: rendered from {len(card['reports'])} report(s) (sections left out for lack of a report: "
          f"{', '.join(card['sections_left_out']) or 'none'}); checked against the model: "
          f"{', '.join(card['checked_against_model']) or 'nothing to compare'}")
    print(f"checked: {weights['tensors']} tensors, {weights['parameters']:,} parameters in {len(weights['files'])} "
          f"safetensors file(s); tokenizer {tokenizer['tokenizer_length']:,} tokens, vocab_size {tokenizer['vocab_size']:,}")

    # The card goes into the folder only for a real upload; a dry run leaves a preview beside its report.
    if args.dry_run:
        card["path"] = str(report_dir / "README.preview.md")
        report_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(card["path"]), card_text)
    else:
        card["path"] = str(model_dir / "README.md")
        write_text_atomic(model_dir / "README.md", card_text)
    card_bytes = card_text.encode("utf-8")
    files = sorted(set(files) | {"README.md"})
    total = sum((model_dir / name).stat().st_size for name in files if name != "README.md") + len(card_bytes)
    local = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", disable=None) as progress:
        for name in files:
            if name == "README.md":  # the rendered card, whether or not it is in the folder yet
                local[name] = {"size": len(card_bytes), "sha256": hashlib.sha256(card_bytes).hexdigest()}
                progress.update(len(card_bytes))
                continue
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
        "left_out": left_out, "card": card, "weights": weights, "tokenizer": tokenizer, "problems": [],
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
        print(f"\ndry run: nothing uploaded; the card is in {card['path']}")
    report["seconds"] = round(time.time() - started, 2)
    report_path = write_json_atomic(report_dir / "publish_report.json", report)
    print(f"report: {report_path}")
    return report


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(PublishArguments).parse_args_into_dataclasses()
    from huggingface_hub import get_token

    token = get_token() if not args.dry_run else None
    try:
        publish(args)
    except Exception as error:  # the token must not leak through any error message
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(error, ValueError):  # bad input: PublishError, a bad report or card config
            message = str(error) if isinstance(error, PublishError) else f"{type(error).__name__}: {error}"
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
