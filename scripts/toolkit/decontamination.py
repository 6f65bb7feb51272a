"""Character n-gram overlap between training text and evaluation items (decontamination).

The published recipe mixed benchmark training sets into its corpus, and a web crawl holds
copies of public test sets. Two stages need the same test: selection drops every raw
document that shares a character n-gram (default 13) with an evaluation item, and the
ablation reports, per task, how many of its items share one with the pretraining mix.

The n-gram's unit fits the language: a character, except that a run of ASCII letters and
digits (an English word, a number, a command name) is one unit. So 13 units are 13 Japanese
characters or 13 English words (the 13-gram of GPT-3's and lm-eval's decontamination): with
a unit per character, one 13-letter word ("documentation", "configuration") would mark an
English page as a copy of a Debian-manual question (in the demo, 907 of 1,871 English pool
documents). Text is compared after NFKC, lowercasing and removing all whitespace (Japanese
has no spaces, and a web copy differs from a benchmark's file mostly in spacing and width):
each word first becomes one private-use character (a 64-bit hash of the word folded onto
the 131,068 code points of planes 15-16). Every n-gram is hashed to 64 bits with a
polynomial over code points (vectorised numpy, the same on every process and machine); a
collision between an unrelated 13-gram and one of the few million evaluation n-grams is
~1e-12 per n-gram, far below anything a report shows.
"""

import functools
import hashlib
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from toolkit.corpus import CorpusError, expand_paths, iter_lines

DEFAULT_NGRAM = 13
_K = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S31, _S27 = np.uint64(31), np.uint64(27)
# Keys of task records that hold bookkeeping, not text a model is asked about (a benchmark's subject
# names, e.g. JMMLU's, are shared by all its items and would count as overlaps with any page naming them).
_NOT_ITEM_TEXT = {"id", "source", "origin", "label", "lang", "primary_metric", "subject", "subject_ja"}


_ASCII_WORD = re.compile(r"[a-z0-9]+")
_WORD_PLANES = 0xF0000, 0x20000 - 4  # U+F0000..U+10FFFB: supplementary private use areas A and B


@functools.lru_cache(maxsize=1 << 17)
def _word_unit(word: str) -> str:
    digest = int.from_bytes(hashlib.blake2b(word.encode("ascii"), digest_size=8).digest(), "little")
    return chr(_WORD_PLANES[0] + digest % _WORD_PLANES[1])


def normalize_for_overlap(text: str) -> str:
    """NFKC, lowercase, each run of ASCII letters/digits as one character, no whitespace at all."""
    lowered = unicodedata.normalize("NFKC", text).lower()
    return "".join(_ASCII_WORD.sub(lambda word: _word_unit(word.group()), lowered).split())


def ngram_hashes(normalized_texts, n: int):
    """64-bit hashes of every character n-gram of each text, all texts at once.

    Returns (hashes, owners): `owners[i]` is the index of the text n-gram `i` comes from.
    A text shorter than n characters has none.
    """
    lengths = np.fromiter(map(len, normalized_texts), dtype=np.int64, count=len(normalized_texts))
    if n < 1:
        raise ValueError(f"the n-gram length must be >= 1 (got {n})")
    joined = "".join(normalized_texts).encode("utf-32-le", errors="surrogatepass")
    codes = np.frombuffer(joined, dtype=np.uint32).astype(np.uint64)
    if len(codes) < n:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    chain = codes[: len(codes) - n + 1].copy()
    for step in range(1, n):  # chain[i] = sum_j codes[i + j] K^(n-1-j), modulo 2**64
        chain *= _K
        chain += codes[step: len(codes) - n + 1 + step]
    chain ^= chain >> _S31
    chain *= _MIX1
    chain ^= chain >> _S27
    chain *= _MIX2
    ends = np.cumsum(lengths)
    positions = np.arange(len(chain))
    owners = np.searchsorted(ends, positions, side="right")
    valid = positions + n <= ends[owners]  # an n-gram must not cross into the next text
    return chain[valid], owners[valid]


def _item_texts(value):
    """Every string inside a task record (prompts, choices, references, chat turns)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, inner in value.items():
            if key not in _NOT_ITEM_TEXT:
                yield from _item_texts(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _item_texts(inner)


def item_text(record) -> str:
    """The text of one evaluation item: every string of the record (prompts, choices, references,
    contexts, chat turns) joined by newlines; bookkeeping keys (id, label, ...) left out."""
    return "\n".join(_item_texts(record))


def read_eval_items(path):
    """The items of one evaluation file: a JSONL(.gz) file gives one item per record (all its
    text fields joined), any other file is one item (its whole text)."""
    name = str(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        items = []
        for line_number, raw in iter_lines(name):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise CorpusError(f"{name}:{line_number}: not a valid JSON line ({error})") from None
            items.append(item_text(record))
        return items
    try:
        return [Path(name).read_text(encoding="utf-8")]
    except UnicodeDecodeError as error:
        raise CorpusError(f"{name}: not UTF-8 text ({error})") from None


def task_name(path) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json", ".txt"):
        name = name.removesuffix(suffix)
    return name


class EvalNgramIndex:
    """The n-grams of evaluation items, each remembering which tasks (files) it comes from."""

    def __init__(self, n: int = DEFAULT_NGRAM):
        if n < 1:
            raise ValueError(f"the n-gram length must be >= 1 (got {n})")
        self.n = n
        self.tasks = []  # task names; a task's bit in `masks` is its index
        self.items = {}  # task -> number of items
        self._hashes = np.zeros(0, dtype=np.uint64)
        self._masks = np.zeros(0, dtype=np.uint64)

    @classmethod
    def from_files(cls, patterns, n: int = DEFAULT_NGRAM):
        index = cls(n)
        for path in expand_paths(patterns):
            index.add(task_name(path), read_eval_items(path))
        return index

    def add(self, task: str, items):
        if task in self.items:
            raise ValueError(f"two evaluation files are both named {task!r}; rename one")
        if len(self.tasks) == 64:
            raise ValueError("at most 64 evaluation tasks can be told apart; merge some files")
        bit = np.uint64(1 << len(self.tasks))
        self.tasks.append(task)
        self.items[task] = len(items)
        hashes, _ = ngram_hashes([normalize_for_overlap(item) for item in items], self.n)
        hashes = np.concatenate([self._hashes, hashes])
        masks = np.concatenate([self._masks, np.full(len(hashes) - len(self._hashes), bit, dtype=np.uint64)])
        order = np.argsort(hashes, kind="stable")
        hashes, masks = hashes[order], masks[order]
        unique, first = np.unique(hashes, return_index=True)
        self._hashes = unique
        self._masks = np.bitwise_or.reduceat(masks, first) if len(first) else masks[:0]

    @property
    def num_ngrams(self) -> int:
        return len(self._hashes)

    def overlapping_tasks(self, texts) -> list:
        """For each text, the sorted names of the tasks it shares an n-gram with ([] if none)."""
        hashes, owners = ngram_hashes([normalize_for_overlap(text) for text in texts], self.n)
        found = np.zeros(len(texts), dtype=np.uint64)
        if len(hashes) and len(self._hashes):
            positions = np.searchsorted(self._hashes, hashes)
            positions[positions == len(self._hashes)] = 0
            hits = self._hashes[positions] == hashes
            np.bitwise_or.at(found, owners[hits], self._masks[positions[hits]])
        return [[task for bit, task in enumerate(self.tasks) if int(mask) >> bit & 1] for mask in found]


# ----- lm-evaluation-harness tasks as evaluation items -------------------------------------------
LM_EVAL_PREFIX = "lm_eval:"


def is_lm_eval_task(entry: str) -> bool:
    """`lm_eval:NAME`, or a bare NAME (letters, digits, _ and -; no path, extension or glob)
    that is not an existing file: an lm-eval task or group, not an evaluation file."""
    if entry.startswith(LM_EVAL_PREFIX):
        return True
    return re.fullmatch(r"[A-Za-z0-9_\-]+", entry) is not None and not Path(entry).exists()


def lm_eval_task_items(names, include_path=None, limit=None) -> dict:
    """{task: [item text]}: the documents each lm-eval task evaluates (a group: each of its tasks),
    the first `limit` of them as `--lm_eval_limit` takes, every string field of a document joined
    (question, context, choices, answers), as for a task JSONL record. Loads the tasks' data
    (the Hub, or the local files their YAMLs name) through lm-eval itself."""
    from itertools import islice

    from toolkit.evaluation import lm_eval_task_manager_for

    names = [name.removeprefix(LM_EVAL_PREFIX) for name in names]
    loaded = lm_eval_task_manager_for(names, include_path).load_task_or_group(names)
    items = {}

    def collect(tree):
        for name, value in tree.items():
            if isinstance(value, dict):  # a group: {ConfigurableGroup: {task: Task}}
                collect(value)
            else:
                items[name] = [item_text(dict(doc)) for doc in islice(value.eval_docs, limit)]

    collect(loaded)
    return items


def materialize_lm_eval_tasks(entries, folder, include_path=None) -> list:
    """`--decontaminate_against` entries with every lm-eval task (or group) name replaced by a
    JSONL file of its items, `folder/<name>.jsonl` (one record per document; a group's tasks in
    one file, named after the group). The file is rewritten only when its items change, so a
    cache keyed on its modification time stays valid."""
    resolved = []
    for entry in entries:
        if not is_lm_eval_task(entry):
            resolved.append(entry)
            continue
        name = entry.removeprefix(LM_EVAL_PREFIX)
        items = [text for texts in lm_eval_task_items([name], include_path).values() for text in texts]
        if not items:
            raise CorpusError(f"--decontaminate_against {entry}: the lm-eval task has no documents to evaluate")
        path = Path(folder) / f"{name}.jsonl"
        content = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in items)
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".jsonl.tmp")
            temporary.write_text(content, encoding="utf-8")
            temporary.replace(path)
        resolved.append(str(path))
    return resolved


# The reason a data stage counts a dropped document under: OVERLAP_REASON + the first task it overlaps.
OVERLAP_REASON = "overlaps_eval:"


@functools.lru_cache(maxsize=4)
def cached_index(files: tuple, n: int = DEFAULT_NGRAM) -> EvalNgramIndex:
    """The n-gram index of evaluation files, built once per worker process."""
    return EvalNgramIndex.from_files(list(files), n)


def overlap_reason(index, text):
    """None if `text` shares no n-gram with an evaluation item, else the reason to count its drop under."""
    found = index.overlapping_tasks([text])[0]
    return OVERLAP_REASON + found[0] if found else None


def split_overlap_counts(skipped: dict) -> tuple:
    """({reason: count} without overlaps, {task: documents dropped}) from a stage's skip counts."""
    kept = {reason: count for reason, count in skipped.items() if not reason.startswith(OVERLAP_REASON)}
    dropped = {reason.removeprefix(OVERLAP_REASON): count for reason, count in skipped.items()
               if reason.startswith(OVERLAP_REASON)}
    return kept, dropped
