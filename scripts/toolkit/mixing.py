"""The JA/EN mix as datatrove stages (the engine is `toolkit.data_engine`).

    count (map) -> plan (1 task) -> scatter (map) -> shuffle (map over buckets) -> report (1 task)

- count: every document of each input unit is counted in tokens of the training tokenizer
  (special-token parsing off: a document that spells "<s>" is those characters), with the
  toolkit's bad-record accounting.
- plan: all Japanese is used; English is taken in file and line order until its tokens are
  the requested share of all tokens (the first document that reaches it included).
- scatter: each kept record (plus "lang", unless it has one) goes to shuffle bucket
  hash(seed, file, line) mod B, with a 64-bit sort key from the same hash.
- shuffle: bucket b gathers its records from every unit, orders them by key and writes
  OUT/text/NNNNN.jsonl.gz. Memory is one bucket; the output depends on the seed and the
  bucket count, never on the number of tasks.
- report: mix_report.json.

Token counts, the plan and the stage markers are a cache under OUT/cache/<key>/; the
scattered records are temporary (OUT/.tmp/<key>/), removed when the run ends, however it
ends, except by SIGKILL, after which the same command resumes and then removes them.
"""

import contextlib
import gzip
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass

import numpy as np
from datatrove.pipeline.base import PipelineStep

from toolkit.corpus import BadRecord, CorpusError, bad_record_error, parse_line
from toolkit.decontamination import cached_index, overlap_reason
from toolkit.data_engine import (Stage, atomic_output, file_key, iter_raw_lines, line_hashes, load_arrays, load_cached,
                                 read_json, save_arrays, units_of_rank, write_json)

SIDES = ("ja", "en")
BATCH = 256


@dataclass
class MixPlan:
    """Paths and settings every mix stage reads (pickled into each task)."""

    japanese_paths: list
    english_paths: list
    units: list  # data_engine.WorkUnit over japanese_paths + english_paths (file_index into that list)
    tasks: int
    tokenizer_path: str
    english_token_share: float
    allow_lower_english_share: bool
    seed: int
    shuffle_buckets: int
    text_field: str
    skip_bad_records: bool
    overwrite_lang: bool
    cache_dir: str
    tmp_dir: str
    output_dir: str
    report: dict
    decontaminate_against: tuple = ()  # evaluation files; documents sharing an n-gram with an item are dropped
    decontamination_ngram: int = 13

    @property
    def paths(self):
        return self.japanese_paths + self.english_paths

    def side(self, file_index):
        return "ja" if file_index < len(self.japanese_paths) else "en"

    @property
    def text_dir(self):
        return os.path.join(self.output_dir, "text")


def mix_stages(plan: MixPlan) -> list:
    cached = os.path.join(plan.cache_dir, "logs")
    temporary = os.path.join(plan.tmp_dir, "logs")
    return [
        Stage("count", [CountTokens(plan)], plan.tasks, os.path.join(cached, "count")),
        Stage("plan", [PlanMix(plan)], 1, os.path.join(cached, "plan")),
        Stage("scatter", [ScatterRecords(plan)], plan.tasks, os.path.join(temporary, "scatter")),
        Stage("shuffle", [ShuffleBuckets(plan)], min(plan.tasks, plan.shuffle_buckets), os.path.join(temporary, "shuffle")),
        Stage("report", [WriteMixReport(plan)], 1, os.path.join(temporary, "report")),
    ]


class _Step(PipelineStep):
    type = "🥣 MIX"

    def __init__(self, plan):
        super().__init__()
        self.plan = plan


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def count_tokens(tokenizer, texts):
    """Tokens of each text as training will see it: no BOS/EOS, special-token strings split as text."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [len(ids) for ids in encoded]


def _records(plan, unit):
    """(line, record or None, reason) of one unit; a bad line raises unless skip_bad_records; a
    document sharing an n-gram with an evaluation item (--decontaminate_against) is dropped,
    both languages, counted under `decontamination.OVERLAP_REASON` + task."""
    index = cached_index(tuple(plan.decontaminate_against), plan.decontamination_ngram) \
        if plan.decontaminate_against else None
    for line_number, raw in iter_raw_lines(unit.path, unit.part, unit.parts):
        try:
            record = parse_line(raw, plan.text_field)
        except BadRecord as bad:
            if not plan.skip_bad_records:
                raise bad_record_error(unit.path, line_number, bad) from None
            yield line_number, None, bad.reason
            continue
        reason = overlap_reason(index, record[plan.text_field]) if index is not None else None
        yield line_number, (None if reason else record), reason


class CountTokens(_Step):
    """Map: tokens and characters of every document of each unit."""

    name = "count tokens"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        tokenizer = load_tokenizer(plan.tokenizer_path)
        for unit in units_of_rank(plan.units, rank, world_size):
            lines, tokens, chars, skipped = [], [], [], Counter()
            batch_lines, batch_texts = [], []

            def flush():
                lines.extend(batch_lines)
                tokens.extend(count_tokens(tokenizer, batch_texts))
                chars.extend(map(len, batch_texts))
                batch_lines.clear()
                batch_texts.clear()

            for line_number, record, reason in _records(plan, unit):
                if record is None:
                    skipped[reason] += 1
                    continue
                batch_lines.append(line_number)
                batch_texts.append(record[plan.text_field])
                if len(batch_texts) >= BATCH:
                    flush()
            flush()
            self.stat_update("documents_counted", value=len(lines))
            save_arrays(os.path.join(plan.cache_dir, "counts", f"unit_{unit.index:05d}.npz"),
                        lines=np.asarray(lines, dtype=np.int64), tokens=np.asarray(tokens, dtype=np.int64),
                        chars=np.asarray(chars, dtype=np.int64), skipped=np.asarray(json.dumps(dict(skipped))))


class PlanMix(_Step):
    """One task: Japanese totals, and the last English (file, line) that reaches the share."""

    name = "plan mix"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        totals = {side: {"documents": 0, "tokens": 0, "characters": 0} for side in SIDES}
        skipped = {side: Counter() for side in SIDES}
        english_files = {}
        for unit in plan.units:
            counts = load_cached(os.path.join(plan.cache_dir, "counts", f"unit_{unit.index:05d}.npz"),
                                 os.path.join(plan.cache_dir, "logs", "count"), unit.index % plan.tasks)
            side = plan.side(unit.file_index)
            skipped[side].update(json.loads(str(counts["skipped"])))
            if side == "ja":
                totals["ja"]["documents"] += len(counts["lines"])
                totals["ja"]["tokens"] += int(counts["tokens"].sum())
                totals["ja"]["characters"] += int(counts["chars"].sum())
            else:
                english_files.setdefault(unit.file_index, []).append(counts)
        if totals["ja"]["tokens"] == 0:
            raise CorpusError(f"no Japanese text in {plan.japanese_paths}")
        needed = plan.english_token_share / (1 - plan.english_token_share) * totals["ja"]["tokens"]
        cutoff = None  # (file_index, line) of the last English document used
        en = totals["en"]
        for file_index in sorted(english_files):
            if needed == 0 or en["tokens"] >= needed:
                break
            parts = english_files[file_index]
            lines = np.concatenate([p["lines"] for p in parts])
            order = np.argsort(lines, kind="stable")  # the file's line order, whatever the parts
            lines = lines[order]
            tokens = np.concatenate([p["tokens"] for p in parts])[order]
            chars = np.concatenate([p["chars"] for p in parts])[order]
            running = en["tokens"] + np.cumsum(tokens)
            reach = int(np.searchsorted(running, needed, side="left"))  # first document at or past the need
            take = min(reach + 1, len(lines))
            en["documents"] += take
            en["tokens"] += int(tokens[:take].sum())
            en["characters"] += int(chars[:take].sum())
            if take:
                cutoff = [file_index, int(lines[take - 1])]
        achieved = en["tokens"] / (totals["ja"]["tokens"] + en["tokens"])
        short = en["tokens"] < needed
        if short and not plan.allow_lower_english_share:
            raise CorpusError(
                f"the English files {plan.english_paths} hold {en['tokens']:,} tokens, fewer than the {needed:,.0f} "
                f"needed for an English share of {plan.english_token_share} (reached {achieved:.4f}); add English "
                f"files, lower --english_token_share, or pass --allow_lower_english_share to accept {achieved:.4f}")
        write_json(os.path.join(plan.cache_dir, "plan.json"), {
            "totals": totals, "skipped_bad_records": {side: dict(skipped[side]) for side in SIDES},
            "english_cutoff": cutoff, "english_tokens_needed": needed, "achieved": achieved, "reached": not short})


def _keep_mask(plan, unit, lines, cutoff):
    if plan.side(unit.file_index) == "ja":
        return np.ones(len(lines), dtype=bool)
    if cutoff is None or unit.file_index > cutoff[0]:
        return np.zeros(len(lines), dtype=bool)
    if unit.file_index < cutoff[0]:
        return np.ones(len(lines), dtype=bool)
    return lines <= cutoff[1]


class ScatterRecords(_Step):
    """Map: each kept record of a unit, with "lang", into its shuffle bucket (one file per unit,
    sorted by bucket, with the byte offsets of each bucket)."""

    name = "scatter"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        cutoff = read_json(os.path.join(plan.cache_dir, "plan.json"))["english_cutoff"]
        for unit in units_of_rank(plan.units, rank, world_size):
            side = plan.side(unit.file_index)
            kept_lines, payloads, kept_lang = [], [], 0
            for line_number, record, _ in _records(plan, unit):
                if record is None:
                    continue
                if not _keep_mask(plan, unit, np.asarray([line_number]), cutoff)[0]:
                    if side == "en" and cutoff and line_number > cutoff[1] and unit.parts == 1:
                        break  # English past the cutoff: nothing more to read in this file
                    continue
                if "lang" in record and not plan.overwrite_lang:
                    kept_lang += 1
                else:
                    record["lang"] = side
                kept_lines.append(line_number)
                payloads.append((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            lines = np.asarray(kept_lines, dtype=np.int64)
            hashes = _line_hashes(plan.seed, unit.path, lines)
            buckets = (hashes % np.uint64(plan.shuffle_buckets)).astype(np.int64)
            order = np.lexsort((lines, hashes, buckets))
            offsets = np.zeros(plan.shuffle_buckets + 1, dtype=np.int64)
            with atomic_output(os.path.join(plan.tmp_dir, "scatter", f"unit_{unit.index:05d}.jsonl")) as stream:
                for index in order:
                    stream.write(payloads[index])
                    offsets[buckets[index] + 1] += len(payloads[index])
            base = os.path.join(plan.tmp_dir, "scatter", f"unit_{unit.index:05d}")
            for name, values in (("keys", hashes[order]), ("lines", lines[order])):  # memory-mapped by the shuffle
                with atomic_output(f"{base}.{name}.npy") as stream:
                    np.save(stream, values)
            save_arrays(f"{base}.npz", offsets=np.cumsum(offsets),
                        counts=np.bincount(buckets, minlength=plan.shuffle_buckets), kept_lang=np.asarray(kept_lang))
            self.stat_update("documents_scattered", value=len(lines))


def _line_hashes(seed, path, lines):
    # another stream than the selection's noise for the same seed: the key is salted with "mix"
    return line_hashes(file_key(f"mix-{seed}", path), lines)


class ShuffleBuckets(_Step):
    """Map over buckets: a bucket's records from every unit, in key order, as one gzip shard."""

    name = "shuffle"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        # Per unit: bucket offsets (small, all kept); keys and lines memory-mapped, one bucket's slice read.
        indexes = [load_arrays(os.path.join(plan.tmp_dir, "scatter", f"unit_{u.index:05d}.npz")) for u in plan.units]
        for bucket in range(rank, plan.shuffle_buckets, world_size):
            keys, files, lines, payloads = [], [], [], []
            for unit, index in zip(plan.units, indexes):
                start, end = int(index["offsets"][bucket]), int(index["offsets"][bucket + 1])
                if end == start:
                    continue
                first = int(index["counts"][:bucket].sum())
                count = int(index["counts"][bucket])
                base = os.path.join(plan.tmp_dir, "scatter", f"unit_{unit.index:05d}")
                with open(f"{base}.jsonl", "rb") as stream:
                    stream.seek(start)
                    chunk = stream.read(end - start).splitlines(keepends=True)
                if len(chunk) != count:
                    raise CorpusError(f"{base}.jsonl: {len(chunk)} records where {count} were written; delete "
                                      f"{plan.tmp_dir} and run again")
                payloads.extend(chunk)
                keys.append(np.array(np.load(f"{base}.keys.npy", mmap_mode="r")[first:first + count]))
                lines.append(np.array(np.load(f"{base}.lines.npy", mmap_mode="r")[first:first + count]))
                files.append(np.full(count, unit.file_index, dtype=np.int64))
            shard = os.path.join(plan.text_dir, f"{bucket:05d}.jsonl.gz")
            if not payloads:
                if os.path.exists(shard):
                    os.remove(shard)
                continue
            order = np.lexsort((np.concatenate(lines), np.concatenate(files), np.concatenate(keys)))
            with atomic_output(shard) as stream, gzip.GzipFile(fileobj=stream, mode="wb", mtime=0, filename="") as out:
                for index in order:
                    out.write(payloads[index])
            self.stat_update("documents_written", value=len(payloads))


class WriteMixReport(_Step):
    name = "report"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        planned = read_json(os.path.join(plan.cache_dir, "plan.json"))
        totals = planned["totals"]
        written = kept_lang = 0
        for unit in plan.units:
            index = load_arrays(os.path.join(plan.tmp_dir, "scatter", f"unit_{unit.index:05d}.npz"))
            written += int(index["counts"].sum())
            kept_lang += int(index["kept_lang"])
        expected = totals["ja"]["documents"] + totals["en"]["documents"]
        if written != expected:
            raise AssertionError(f"{written} documents written to the mix, {expected} planned")
        ja, en = totals["ja"]["tokens"], totals["en"]["tokens"]
        shards = sorted(name for name in os.listdir(plan.text_dir) if name.endswith(".jsonl.gz"))
        write_json(os.path.join(plan.output_dir, "mix_report.json"), {
            "stage": "mix",
            **plan.report,
            "output": {"text_dir": plan.text_dir, "text_files": [os.path.join(plan.text_dir, s) for s in shards],
                       "format": "gzip JSONL, one record per line: its fields plus \"lang\""},
            "tokens": {"ja": ja, "en": en, "total": ja + en},
            "documents": {"ja": totals["ja"]["documents"], "en": totals["en"]["documents"], "total": expected},
            "characters": {side: totals[side]["characters"] for side in SIDES},
            "characters_per_token": {side: round(totals[side]["characters"] / totals[side]["tokens"], 3)
                                     if totals[side]["tokens"] else None for side in SIDES},
            "english_share": {"target": plan.english_token_share, "achieved": round(planned["achieved"], 5),
                              "reached": planned["reached"],
                              "english_tokens_needed": round(planned["english_tokens_needed"])},
            "lang_field": {"existing_kept": kept_lang, "overwrite_lang": plan.overwrite_lang},
            "skipped_bad_records": planned["skipped_bad_records"],
        })


class MixTextReader(_Step):
    """The mix's text shards as datatrove Documents, shard i to task i mod tasks (what the token
    shard steps read; listed when the task runs, after the shuffle wrote them)."""

    name = "mix text"

    def __init__(self, text_dir, text_field="text"):
        PipelineStep.__init__(self)
        self.text_dir, self.text_field = text_dir, text_field

    def run(self, data=None, rank=0, world_size=1):
        from datatrove.data import Document

        shards = sorted(name for name in os.listdir(self.text_dir) if name.endswith(".jsonl.gz"))
        for name in shards[rank::world_size]:
            with gzip.open(os.path.join(self.text_dir, name), "rb") as stream:
                for line_number, raw in enumerate(stream, start=1):
                    self.stat_update("documents")
                    yield Document(text=json.loads(raw)[self.text_field], id=f"{name}:{line_number}")


def remove_temporary(plan):
    shutil.rmtree(plan.tmp_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the .tmp folder itself, once no other mix uses it
        os.rmdir(os.path.dirname(plan.tmp_dir))
