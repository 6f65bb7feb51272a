#!/usr/bin/env python
"""Pin every Hub URL of the task YAMLs to a commit (needs network):

    python sample_data/tasks/lm_eval/pin_revisions.py [--tasks_dir sample_data/tasks/lm_eval] [--dry_run]

A YAML reads its data as `hf://datasets/OWNER/NAME@REF/PATH`. Where REF is not a commit (40 hex
digits) but a branch or a moving ref such as the parquet converter's `refs/convert/parquet`
(which moves when the Hub converts the dataset again), the same YAML may read other data next
month. This asks the Hub which commit REF points to now (the resolution the ablation's report
uses, `toolkit.evaluation.resolve_hub_dataset_revision`), checks that every file the YAML reads
exists at that commit (`HfApi.get_paths_info`, one question per commit), and rewrites REF in the URL with the commit: every other byte of the
YAML (comments, order, quoting) stays as it was. It prints a table (task, repo, ref -> commit,
files checked); `--dry_run` writes nothing.

Everything is resolved and checked before anything is written, and each file is written
atomically (a temporary file, then a rename): the Hub unreachable, a ref it does not know or a
file missing at the commit stops with an error naming the YAML, line and URL, and nothing changed.
"""

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from huggingface_hub import RepoFile
from transformers import HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))

from toolkit.evaluation import (  # noqa: E402
    COMMIT, HUB_DATASET_URL, HubUnreachableError, asking_the_hub, resolve_hub_dataset_revision,
)


@dataclass
class PinArguments:
    tasks_dir: str = field(default="sample_data/tasks/lm_eval", metadata={
        "help": "Folder of lm-eval task YAMLs; every *.yaml in it is pinned."})
    dry_run: bool = field(default=False, metadata={
        "help": "Resolve and check everything, print the table, write nothing."})


class PinError(Exception):
    """Why nothing was pinned: the YAML, line and URL at fault, and what to do."""


@dataclass
class HubUrl:
    """One hf://datasets URL in a YAML's text: where it is and what it names."""
    yaml: Path
    line: int
    start: int  # offset of REF in the text: the span that pinning rewrites
    end: int
    url: str
    repo: str
    ref: str  # unquoted: refs/convert/parquet
    path: str

    @property
    def where(self):
        return f"{self.yaml}:{self.line}: {self.url}"


def task_name(text, yaml):
    """The YAML's `task:` (the name lm-eval knows it by), else the file's stem."""
    for line in text.splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    return yaml.stem


def hub_urls(yaml, text):
    """Every hf://datasets URL in `text`, with its line."""
    return [HubUrl(yaml=yaml, line=text.count("\n", 0, match.start()) + 1, start=match.start("revision"),
                   end=match.end("revision"), url=match[0], repo=match["repo"], ref=unquote(match["revision"]),
                   path=match["path"])
            for match in HUB_DATASET_URL.finditer(text)]


def resolve(urls):
    """{(repo, ref): commit} for every ref of `urls`, after checking that every file they name exists at
    that commit; raises PinError when the Hub cannot be reached, does not know a repo or ref, or lacks a file."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    def stop(error, url):
        if isinstance(error, HubUnreachableError):
            return PinError(f"{error}; nothing was changed (run this where the Hub can be reached)")
        return PinError(f"{url.where}: the Hub answers {type(error).__name__} for {url.repo}@{url.ref} "
                        f"({str(error).splitlines()[0]}); nothing was changed")

    commits = {}
    for url in urls:
        if (url.repo, url.ref) not in commits:
            try:
                commits[(url.repo, url.ref)] = resolve_hub_dataset_revision(url.repo, url.ref)
            except (HubUnreachableError, HfHubHTTPError) as error:
                raise stop(error, url) from error
    wanted = {}  # (repo, commit) -> the URLs that read a file there: one question per commit
    for url in urls:
        wanted.setdefault((url.repo, commits[(url.repo, url.ref)]), []).append(url)
    missing = []
    for (repo, commit), reading in wanted.items():
        try:
            with asking_the_hub():
                found = HfApi().get_paths_info(repo, sorted({url.path for url in reading}), revision=commit,
                                               repo_type="dataset")
        except (HubUnreachableError, HfHubHTTPError) as error:
            raise stop(error, reading[0]) from error
        files = {entry.path for entry in found if isinstance(entry, RepoFile)}
        missing += [f"{url.where}: no file {url.path} at commit {commit}, where {url.ref} points now "
                    f"(the files: {constants.ENDPOINT}/datasets/{repo}/tree/{commit})"
                    for url in reading if url.path not in files]
    if missing:
        raise PinError("\n".join(missing) + "\nnothing was changed: fix the path in the YAML and run again")
    return commits


def pinned_text(text, urls, commits):
    """`text` with each moving ref replaced by its commit, every other character as it was."""
    pieces, position = [], 0
    for url in sorted(urls, key=lambda u: u.start):
        pieces += [text[position:url.start], commits[(url.repo, url.ref)]]
        position = url.end
    return "".join(pieces) + text[position:]


def write_atomically(path, data: bytes):
    """Replace `path` by `data` through a temporary file in the same folder and a rename, keeping its mode."""
    mode = path.stat().st_mode & 0o7777
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def pin(tasks_dir, dry_run=False, out=print):
    """Pin every YAML under `tasks_dir`; returns {yaml path: new text} of those that change (written
    unless `dry_run`). Raises PinError with nothing written."""
    tasks_dir = Path(tasks_dir)
    yamls = sorted(tasks_dir.glob("*.yaml"))
    if not yamls:
        raise PinError(f"no *.yaml in {tasks_dir}: pass --tasks_dir, the folder of the task YAMLs")
    texts = {yaml: yaml.read_bytes().decode("utf-8") for yaml in yamls}  # bytes: \r\n stays \r\n
    urls = {yaml: hub_urls(yaml, text) for yaml, text in texts.items()}
    moving = {yaml: [url for url in found if not COMMIT.fullmatch(url.ref)] for yaml, found in urls.items()}
    commits = resolve([url for found in moving.values() for url in found])

    rows = [("task", "repo", "ref -> commit", "files checked")]
    for yaml, found in moving.items():
        for repo, ref in dict.fromkeys((url.repo, url.ref) for url in found):
            rows.append((task_name(texts[yaml], yaml), repo, f"{ref} -> {commits[(repo, ref)]}",
                         str(sum(url.repo == repo and url.ref == ref for url in found))))
    changed = {yaml: pinned_text(texts[yaml], found, commits) for yaml, found in moving.items() if found}
    if len(rows) > 1:
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        for row in rows:
            out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    already = sorted({f"{url.repo}@{url.ref[:12]}" for found in urls.values() for url in found
                      if COMMIT.fullmatch(url.ref)})
    if already:
        out(f"already pinned: {', '.join(already)}")
    if not changed:
        out(f"nothing to pin in {tasks_dir}: every hf://datasets URL names a commit")
    elif dry_run:
        out(f"dry run: {len(changed)} YAMLs would change, nothing written")
    else:
        for yaml, text in changed.items():
            write_atomically(yaml, text.encode("utf-8"))
        out(f"pinned {sum(len(found) for found in moving.values())} URLs in {len(changed)} YAMLs, "
            "each file checked at its commit")
    return changed


def main(argv=None):
    (args,) = HfArgumentParser(PinArguments).parse_args_into_dataclasses(args=argv)
    try:
        pin(args.tasks_dir, dry_run=args.dry_run)
    except PinError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
