#!/usr/bin/env python
"""Build the bundled SFT set and the Japanese ablation tasks from the sample corpus.

    python sample_data/build_eval_tasks.py --output_dir sample_data

Everything comes from real documents in `sample_data/` (Debian documentation in
Japanese), split so that evaluation never sees pretraining or fine-tuning text:

- `sft/sft_ja.jsonl` (chat records, `{"messages": [user, assistant]}`) from the **pool**
  documents (`pool/data/ja/`), which pretraining may also read: fine-tuning teaches the
  answer formats, not the answers.
- `tasks/*.jsonl` from the held-out **eval** documents (`eval/ja_eval.jsonl.gz`), which no
  other stage reads, minus any question whose shown text also occurs in the pool (the
  manuals repeat some sections in a parent section). Tasks are built by fixed rules (below and in `tasks/README.md`) and a
  seeded random choice of distractors, so the same inputs give the same bytes.

Task kinds (the user message is the prompt; the answer is the assistant's reply):
- `heading_mc`: a section's opening text -> its heading, among 4 headings of other sections.
- `heading_generation`: the same prompt, answer generated and scored against the heading.
- `continuation_mc`: a passage -> its true next sentence(s), among 3 from other documents.
- `manpage_mc`: a manual page name -> its one-line description (from its NAME section),
  among 4 descriptions of other pages.
These are small home-made tasks over Debian manuals, not public benchmarks.
"""

import sys
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit.corpus import expand_paths, iter_records
from toolkit.reports import write_json_atomic
from toolkit.text import contains_japanese

# "1.3.4. MC のコマンドライントリック", "第5章 Debian システム...", "4.11. Overview¶"
NUMBERED_HEADING = re.compile(r"^(?:第\d+章|\d+(?:\.\d+)*\.)\s+(?P<title>.+?)\s*¶?$")
# manpages-ja first pieces: "名前\nls - ディレクトリの内容をリスト表示する\n\n書式..."
MANPAGE_NAME = re.compile(r"^名前\n(?P<name>[^\n]+?) - (?P<description>[^\n]+)\n")
SENTENCE_END = "。"

PROMPTS = {
    "heading": "次の節の見出しを一行で答えてください。\n\n{body}",
    "continuation": "次の文章の続きを一文書いてください。\n\n{passage}",
    "manpage": "マニュアルページ「{name}」は何をするものですか。一行で説明してください。",
}


@dataclass
class BuildArguments:
    pool_files: list[str] = field(
        default_factory=lambda: ["sample_data/pool/data/ja/ja_clean_0000.jsonl.gz"],
        metadata={"help": "Documents for the SFT set (may overlap pretraining)."},
    )
    eval_files: list[str] = field(
        default_factory=lambda: ["sample_data/eval/ja_eval.jsonl.gz"],
        metadata={"help": "Held-out documents for the tasks (read by no other stage)."},
    )
    output_dir: str = field(default="sample_data", metadata={"help": "Writes sft/ and tasks/ under it."})
    num_sft_records: int = field(default=360, metadata={"help": "SFT records, a third of each kind when possible."})
    num_choices: int = field(default=4, metadata={"help": "Options per multiple-choice question."})
    body_chars: int = field(default=160, metadata={"help": "Section text shown for heading tasks (cut at a sentence end)."})
    seed: int = field(default=0)


def cut_at_sentence(text, limit, minimum=40):
    """The longest prefix of `text` up to `limit` characters ending with '。' (or a hard cut)."""
    end = text.rfind(SENTENCE_END, 0, limit)
    if end + 1 >= minimum:
        return text[: end + 1]
    return text[:limit].rstrip()


def heading_example(record, body_chars):
    first, _, rest = record["text"].partition("\n\n")
    match = NUMBERED_HEADING.match(first.strip())
    if not match or "\n" in first.strip():
        return None
    title = match.group("title").strip()
    body = " ".join(rest.split())
    if not contains_japanese(title) or len(title) > 40 or len(body) < 80:
        return None
    return {"title": title, "body": cut_at_sentence(body, body_chars)}


def continuation_example(record):
    """A passage of 80-200 characters and the next 1-2 sentences (20-120 characters)."""
    text = record["text"]
    first, _, rest = text.partition("\n\n")
    if NUMBERED_HEADING.match(first.strip()) or MANPAGE_NAME.match(text):
        text = rest
    flat = " ".join(text.split())
    passage = cut_at_sentence(flat, 200, minimum=80)
    if not passage.endswith(SENTENCE_END):
        return None
    following = flat[len(passage):].lstrip()
    end = following.find(SENTENCE_END, 20)
    if end < 0 or end + 1 > 120 or not contains_japanese(following[: end + 1]):
        return None
    return {"passage": passage, "continuation": following[: end + 1]}


def manpage_example(record):
    match = MANPAGE_NAME.match(record["text"])
    if not match or not contains_japanese(match.group("description")):
        return None
    return {"name": match.group("name").strip(), "description": match.group("description").strip()}


def read_documents(patterns):
    documents = []
    for path in expand_paths(patterns):
        for line_number, record in iter_records(path):
            documents.append({**record, "file": str(path), "line": line_number})
    return documents


def extract(documents, body_chars):
    """Per kind, the examples the rules find, in document order."""
    found = {"heading": [], "continuation": [], "manpage": []}
    for document in documents:
        origin = {"source": document.get("source"), "origin": document.get("origin"), "line": document["line"]}
        for kind, example in (
            ("heading", heading_example(document, body_chars)),
            ("continuation", continuation_example(document)),
            ("manpage", manpage_example(document)),
        ):
            if example:
                found[kind].append({**example, **origin})
    return found


# The texts a question shows: none may occur in the pool.
SHOWN_FIELDS = {"heading": ("body",), "continuation": ("passage", "continuation"), "manpage": ("description",)}
ANSWER_FIELD = {"heading": "title", "continuation": "continuation", "manpage": "description"}


def prompt_for(kind, example):
    return PROMPTS[kind].format(**{k: v for k, v in example.items() if isinstance(v, str)})


def multiple_choice(kind, examples, num_choices, rng):
    """One question per example; distractors are other examples' answers (all distinct)."""
    answer = ANSWER_FIELD[kind]
    pool = sorted({example[answer] for example in examples})
    tasks = []
    for index, example in enumerate(examples):
        others = [candidate for candidate in pool if candidate != example[answer]]
        if len(others) < num_choices - 1:
            raise ValueError(f"{kind}: only {len(pool)} distinct answers, cannot make {num_choices} choices")
        choices = rng.sample(others, num_choices - 1) + [example[answer]]
        rng.shuffle(choices)
        tasks.append({
            "id": f"{kind}_mc-{index:04d}", "prompt": prompt_for(kind, example), "choices": choices,
            "label": choices.index(example[answer]), "source": example["source"], "origin": example["origin"],
            "primary_metric": "accuracy",
        })
    return tasks


def generation(kind, examples):
    return [
        {"id": f"{kind}_generation-{index:04d}", "prompt": prompt_for(kind, example),
         "reference": example[ANSWER_FIELD[kind]], "source": example["source"], "origin": example["origin"],
         "primary_metric": "char_f1"}
        for index, example in enumerate(examples)
    ]


def sft_records(found, total, rng):
    """Chat records, round-robin over the kinds, each kind shuffled with the seed."""
    queues = {kind: rng.sample(examples, len(examples)) for kind, examples in found.items()}
    records = []
    while len(records) < total and any(queues.values()):
        for kind in ("heading", "continuation", "manpage"):
            if queues[kind] and len(records) < total:
                example = queues[kind].pop()
                records.append({"messages": [
                    {"role": "user", "content": prompt_for(kind, example)},
                    {"role": "assistant", "content": example[ANSWER_FIELD[kind]]},
                ], "kind": kind, "source": example["source"]})
    return records


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def main():
    (args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses()
    rng = random.Random(args.seed)
    output = Path(args.output_dir)

    pool_documents = read_documents(args.pool_files)
    pool = extract(pool_documents, args.body_chars)
    held_out = extract(read_documents(args.eval_files), args.body_chars)
    # The corpus splits manuals into sections, and a parent section may repeat a child's text:
    # drop held-out examples whose text also occurs in the pool (pretraining may read it).
    pool_text = "\n".join(" ".join(document["text"].split()) for document in pool_documents)
    contaminated = {}
    for kind, examples in held_out.items():
        clean = [e for e in examples if not any(e[f] in pool_text for f in SHOWN_FIELDS[kind])]
        contaminated[kind] = len(examples) - len(clean)
        held_out[kind] = clean
    eval_answers = {answer for kind, examples in held_out.items() for answer in
                    (example[ANSWER_FIELD[kind]] for example in examples)}
    # The SFT set never contains an answer that a task asks for (e.g. the heading "概観").
    pool = {kind: [e for e in examples if e[ANSWER_FIELD[kind]] not in eval_answers] for kind, examples in pool.items()}

    sft = sft_records(pool, args.num_sft_records, rng)
    counts = {"sft/sft_ja.jsonl": write_jsonl(output / "sft" / "sft_ja.jsonl", sft)}
    tasks = {
        "heading_mc": multiple_choice("heading", held_out["heading"], args.num_choices, rng),
        "continuation_mc": multiple_choice("continuation", held_out["continuation"], args.num_choices, rng),
        "manpage_mc": multiple_choice("manpage", held_out["manpage"], args.num_choices, rng),
        "heading_generation": generation("heading", held_out["heading"]),
    }
    for name, rows in tasks.items():
        counts[f"tasks/{name}.jsonl"] = write_jsonl(output / "tasks" / f"{name}.jsonl", rows)
    report = {
        "inputs": {"pool_files": args.pool_files, "eval_files": args.eval_files},
        "seed": args.seed, "num_choices": args.num_choices, "body_chars": args.body_chars,
        "records": counts,
        "sft_kinds": dict(Counter(record["kind"] for record in sft)),
        "held_out_examples_dropped_as_also_in_pool": contaminated,
        "examples_found": {"pool": {k: len(v) for k, v in pool.items()},
                           "eval": {k: len(v) for k, v in held_out.items()}},
    }
    write_json_atomic(output / "tasks" / "build_report.json", report)
    for name, count in counts.items():
        print(f"{count:5d}  {output / name}")


if __name__ == "__main__":
    main()
