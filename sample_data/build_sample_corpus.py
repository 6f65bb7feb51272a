#!/usr/bin/env python
"""Rebuild the bundled sample corpus in `sample_data/` from Debian documentation packages.

The corpus stands in for MADLAD-400 in the offline demo and tests: real Japanese and
English prose (manuals, guides, FAQs, manual pages) written by people, stored in
MADLAD-400's format (gzipped JSONL, one `{"text": ...}` per document, plus provenance
fields) and in MADLAD-400's folder layout (`data/<lang>/<lang>_clean_NNNN.jsonl.gz`)
so the Hub download code can be tested against it.

    python sample_data/build_sample_corpus.py --output_dir sample_data

Needs `apt-get download` (Debian's package registry) and `groff` for manual pages.
The split into pool / target / eval is a deterministic function of each document's
text, so a rebuild from the same package versions gives the same files.
"""

import sys
import gzip
import hashlib
import html.parser
import json
import re
import subprocess
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit.text import japanese_char_ratio

# (package, language, how its documents are extracted, a glob for its files)
SOURCES = [
    ("debian-reference-ja", "ja", "html", "usr/share/debian-reference/*.ja.html"),
    ("developers-reference-ja", "ja", "html", "usr/share/developers-reference/ja/*.html"),
    ("maint-guide-ja", "ja", "html", "usr/share/doc/maint-guide-ja/html/*.html"),
    ("debian-faq-ja", "ja", "html", "usr/share/doc/debian/FAQ/ja/*.html"),
    ("aptitude-doc-ja", "ja", "html", "usr/share/doc/aptitude/html/ja/*.html"),
    ("gimp-help-ja", "ja", "html", "usr/share/gimp/2.0/help/ja/*.html"),
    ("manpages-ja", "ja", "man", "usr/share/man/ja/man*/*.gz"),
    ("debian-reference-en", "en", "html", "usr/share/debian-reference/*.en.html"),
    ("developers-reference", "en", "html", "usr/share/developers-reference/*.html"),
    ("maint-guide", "en", "html", "usr/share/doc/maint-guide/html/*.html"),
    ("debian-faq", "en", "html", "usr/share/doc/debian/FAQ/*.html"),
    ("gimp-help-en", "en", "html", "usr/share/gimp/2.0/help/en/*.html"),
    ("manpages", "en", "man", "usr/share/man/man*/*.gz"),
]

HEADINGS = {"h1", "h2", "h3", "h4"}
SKIPPED_TAGS = {"script", "style", "head", "nav"}
BLOCK_TAGS = HEADINGS | {"p", "div", "pre", "li", "dt", "dd", "tr", "br", "table", "blockquote", "section"}


@dataclass
class BuildArguments:
    output_dir: str = field(default="sample_data", metadata={"help": "Where the corpus is written."})
    debs_dir: str = field(default=None, metadata={"help": "Folder of already downloaded .deb files (default: download)."})
    min_chars: int = field(default=200, metadata={"help": "Documents shorter than this (characters) are dropped."})
    max_chars: int = field(default=3000, metadata={"help": "Longer documents are cut at paragraph ends into pieces."})
    max_docs_per_source: int = field(default=500, metadata={"help": "Cap per package, keeping the corpus a few MB."})
    target_source: str = field(default="debian-reference-ja", metadata={"help": "The JA source the DSIR target is drawn from."})
    target_docs: int = field(default=120, metadata={"help": "Documents in the DSIR target sample."})
    eval_fraction: float = field(default=0.08, metadata={"help": "Share of each source held out for evaluation."})


class SectionSplitter(html.parser.HTMLParser):
    """Turns an HTML page into (heading, text) sections, one per h1-h4 heading."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections = [["", []]]
        self.skip_depth = 0
        self.in_heading = False
        self.in_pre = False

    def handle_starttag(self, tag, attrs):
        if tag in SKIPPED_TAGS:
            self.skip_depth += 1
        elif tag in HEADINGS:
            self.sections.append(["", []])
            self.in_heading = True
        elif tag == "pre":
            self.in_pre = True
        if tag in BLOCK_TAGS:
            self.sections[-1][1].append("\n")

    def handle_endtag(self, tag):
        if tag in SKIPPED_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in HEADINGS:
            self.in_heading = False
        elif tag == "pre":
            self.in_pre = False
        if tag in BLOCK_TAGS:
            self.sections[-1][1].append("\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if not self.in_pre:
            data = re.sub(r"\s+", " ", data)
        if self.in_heading:
            self.sections[-1][0] += data
        else:
            self.sections[-1][1].append(data)


def tidy(text):
    lines = [line.rstrip() for line in text.splitlines()]
    text = "\n".join(line if line.strip() else "" for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_documents(path):
    splitter = SectionSplitter()
    splitter.feed(path.read_text(encoding="utf-8", errors="strict"))
    for heading, parts in splitter.sections:
        heading = re.sub(r"\s+", " ", heading).strip()
        body = tidy("".join(parts))
        yield tidy(f"{heading}\n\n{body}") if heading else body


def man_documents(path):
    rendered = subprocess.run(
        f"zcat '{path}' | preconv -e utf-8 | groff -mandoc -Tutf8 -P-cbou -rLL=2000n -dAD=l 2>/dev/null",
        shell=True, capture_output=True, check=True,
    ).stdout.decode("utf-8")
    # A very long line length and left adjustment keep groff from wrapping and padding
    # Japanese sentences with spaces; the running header and footer are dropped.
    lines = rendered.splitlines()[1:-1]
    yield tidy("\n".join(line.strip() for line in lines))


def split_long(text, max_chars):
    """Cuts a long document at paragraph ends into pieces of at most about max_chars."""
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    pieces.append(current)
    return [piece[:max_chars * 2] for piece in pieces]


def download(packages, into):
    subprocess.run(["apt-get", "download", *packages], cwd=into, check=True)


def extract_source(deb, kind, pattern, args, lang):
    with tempfile.TemporaryDirectory() as root:
        subprocess.run(["dpkg-deb", "-x", str(deb), root], check=True)
        files = sorted(Path(root).glob(pattern))
        if not files:
            raise SystemExit(f"{deb}: no files match {pattern}")
        extract = html_documents if kind == "html" else man_documents
        for path in files:
            for document in extract(path):
                for piece in split_long(document, args.max_chars):
                    if len(piece) < args.min_chars:
                        continue
                    ratio = japanese_char_ratio(piece)
                    # Untranslated pages stay English in the JA packages: keep each language clean.
                    if (lang == "ja" and ratio < 0.25) or (lang == "en" and ratio > 0.0):
                        continue
                    yield piece, str(path.relative_to(root))


def write_jsonl_gz(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as raw:  # mtime=0: identical bytes on rebuild
        for record in records:
            raw.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def text_key(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def main():
    (args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    with tempfile.TemporaryDirectory() as scratch:
        debs_dir = Path(args.debs_dir or scratch)
        if not args.debs_dir:
            download([name for name, *_ in SOURCES], debs_dir)
        by_source = defaultdict(list)
        seen = set()
        versions = {}
        for name, lang, kind, pattern in SOURCES:
            debs = sorted(debs_dir.glob(f"{name}_*.deb"))
            if not debs:
                raise SystemExit(f"{debs_dir}: no {name}_*.deb; run without --debs_dir to download")
            versions[name] = debs[-1].name.split("_")[1]
            for text, origin in extract_source(debs[-1], kind, pattern, args, lang):
                if text_key(text) in seen:  # the same boilerplate section on many pages
                    continue
                seen.add(text_key(text))
                by_source[name].append({"text": text, "source": name, "lang": lang, "origin": origin})

    splits = defaultdict(list)
    for name, lang, *_ in SOURCES:
        documents = sorted(by_source[name], key=lambda d: text_key(d["text"]))[: args.max_docs_per_source]
        n_eval = max(1, round(len(documents) * args.eval_fraction))
        splits[f"eval/{lang}"] += documents[:n_eval]
        rest = documents[n_eval:]
        if name == args.target_source:
            splits["target/ja"] += rest[: args.target_docs]
            rest = rest[args.target_docs:]
        splits[f"pool/{lang}"] += rest

    layout = {
        "pool/ja": "pool/data/ja/ja_clean_0000.jsonl.gz",
        "pool/en": "pool/data/en/en_clean_0000.jsonl.gz",
        "target/ja": "target/ja_target.jsonl.gz",
        "eval/ja": "eval/ja_eval.jsonl.gz",
        "eval/en": "eval/en_eval.jsonl.gz",
    }
    stats = {}
    for split, relative in layout.items():
        records = sorted(splits[split], key=lambda d: text_key(d["text"]))
        write_jsonl_gz(output_dir / relative, records)
        stats[relative] = {
            "documents": len(records),
            "characters": sum(len(r["text"]) for r in records),
            "by_source": dict(Counter(r["source"] for r in records)),
        }
    arguments = {key: value for key, value in vars(args).items() if key != "debs_dir"}
    manifest = {"package_versions": versions, "arguments": arguments, "files": stats}
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
