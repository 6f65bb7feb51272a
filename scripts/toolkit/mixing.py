"""The JA/EN mix as datatrove stages (the engine is `toolkit.data_engine`).

    count-ja (map) -> need (1 task) -> count-en (map) -> plan (1 task) -> scatter (map)
        -> shuffle (map over buckets) -> report (1 task) -> tokens (map over buckets) -> manifest (1 task)

- count-ja: every Japanese document is counted in tokens of the training tokenizer
  (special-token parsing off: a document that spells "<s>" is those characters), with the
  toolkit's bad-record accounting. A document of either language that shares an n-gram with an
  evaluation item (--decontaminate_against) is dropped here, as a reason code per task (so
  English dropped this way never counts toward the share). Cached per file and part (any task
  count reuses it).
- need: the English tokens the share needs.
- count-en (1 task): English files in file and line order, counted only until the share is
  reached; its batches shrink as the need comes near (the documents still needed at the mean
  tokens per document so far, at least 16), so what is tokenised beyond the English used is at
  most one small batch, never the rest of the files. Only as much English is tokenised as the
  mix uses, so one task does it (at 10% English, a tenth of the Japanese count's work).
- plan: all Japanese is used; English is taken in file and line order until its tokens are
  the requested share of all tokens (the first document that reaches it included). The shuffle
  bucket count is the kept bytes / --shuffle_bucket_mb (at least MIN_BUCKETS), unless given.
- scatter: each kept record (plus "lang", unless it has one; the count's reason codes say which
  are dropped) is streamed to the unit's record file; a small index (bucket = hash(seed, file,
  line) mod B, the 64-bit sort key from the same hash, line, byte offset, length) is saved in
  bucket order.
- shuffle: bucket b gathers the index entries of its records from every unit, orders them by
  key and copies the records, one by one, into OUT/text/NNNNN.jsonl.gz. Memory is the index of
  one bucket (40 bytes a record), never the records; the output depends on the seed and the
  bucket count, never on the number of tasks.
- report: mix_report.json (bad lines per reason; decontamination drops per language and task).
- tokens: text shard b becomes token shard b (`toolkit.token_shards`), so the token shards are
  the same files for any task count and executor; manifest: token_shards.json.

Token counts and the plan are a cache under OUT/cache/<key>/; the scattered records are
temporary (OUT/.tmp/<key>/), removed when the run ends, however it ends, except by SIGKILL,
after which the same command resumes and then removes them. The token stages keep their
completion markers inside their output folder (OUT/tokens/.logs/), so the folder and the
markers that describe it are claimed and removed together.
"""

import contextlib
import gzip
import json
import math
import os
import resource
import shutil
from collections import Counter
from dataclasses import dataclass

import numpy as np
from datatrove.pipeline.base import PipelineStep

from toolkit.corpus import BadRecord, CorpusError, bad_record_error, parse_line
from toolkit.decontamination import OVERLAP_REASON, cached_index, overlap_reason, split_overlap_counts
from toolkit.data_engine import (Stage, WorkUnit, atomic_output, file_key, final_files, iter_raw_lines, line_hashes,
                                 load_arrays, load_cached, read_json, reuse_unit_cache, save_arrays, unit_cache_path,
                                 units_of_rank, write_json)

SIDES = ("ja", "en")
BATCH = 256
MIN_BUCKETS = 16  # small mixes still get several shards (training draws blocks across files)
BAD_REASONS = ("blank_line", "invalid_utf8", "malformed_json", "not_an_object", "missing_text", "text_not_string",
               "lone_surrogate")  # the first reason codes of the count caches (MixPlan.reasons)


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
    shuffle_buckets: int | None  # None: from the corpus size and shuffle_bucket_mb
    text_field: str
    skip_bad_records: bool
    overwrite_lang: bool
    cache_dir: str
    tmp_dir: str
    output_dir: str
    report: dict
    names: list = None  # data_engine.canonical_name of each file: the key of its shuffle hash
    shuffle_bucket_mb: float = 256
    decontaminate_against: tuple = ()  # evaluation files; documents sharing an n-gram with an item are dropped
    decontamination_ngram: int = 13
    decontamination_tasks: tuple = ()  # their task names in the index's order (overlap reason codes)

    @property
    def paths(self):
        return self.japanese_paths + self.english_paths

    @property
    def reasons(self):
        """Per-line reason codes of the count caches: 0 = a record, i + 1 = reasons[i]: a bad line's
        reasons, then one overlap reason per evaluation task (an EvalNgramIndex tells at most 64
        apart, so int8 carries every code). The count cache key covers the evaluation files."""
        return BAD_REASONS + tuple(OVERLAP_REASON + task for task in self.decontamination_tasks)

    def side(self, file_index):
        return "ja" if file_index < len(self.japanese_paths) else "en"

    def name(self, file_index):
        return self.names[file_index] if self.names else self.paths[file_index]

    @property
    def text_dir(self):
        return os.path.join(self.output_dir, "text")

    @property
    def japanese_units(self):
        return [unit for unit in self.units if self.side(unit.file_index) == "ja"]

    @property
    def english_units(self):
        return [unit for unit in self.units if self.side(unit.file_index) == "en"]

    def logs(self, stage):
        """Completion markers of a cached stage: per task count (the cached results are per file and part)."""
        return os.path.join(self.cache_dir, "logs", f"tasks_{self.tasks}", stage)

    def buckets(self):
        return read_json(os.path.join(self.cache_dir, "mixes", self.mix_key, "plan.json"))["shuffle_buckets"]

    @property
    def mix_key(self):
        return self.report["keys"]["mix"]

    @property
    def plan_path(self):
        return os.path.join(self.cache_dir, "mixes", self.mix_key, "plan.json")


def plan_units(japanese_paths, english_paths, tasks) -> list:
    """Japanese: one unit per file, or line-interleaved parts when there are fewer files than tasks.
    English: one unit per file, always whole (it is read in line order and stops at the share)."""
    from toolkit.data_engine import plan_units as split

    units = split(japanese_paths, tasks)
    for offset, path in enumerate(english_paths):
        units.append(WorkUnit(len(units), len(japanese_paths) + offset, str(path)))
    return units


def mix_stages(plan: MixPlan) -> list:
    temporary = os.path.join(plan.tmp_dir, "logs")
    return [
        Stage("count-ja", [CountJapanese(plan)], plan.tasks, plan.logs("count-ja")),
        Stage("need", [EnglishNeed(plan)], 1, plan.logs(f"need-{plan.mix_key}")),
        Stage("count-en", [CountEnglish(plan)], 1, plan.logs(f"count-en-{plan.mix_key}")),
        Stage("plan", [PlanMix(plan)], 1, plan.logs(f"plan-{plan.mix_key}")),
        Stage("scatter", [ScatterRecords(plan)], plan.tasks, os.path.join(temporary, "scatter")),
        Stage("shuffle", [ShuffleBuckets(plan)], plan.tasks, os.path.join(temporary, "shuffle")),
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


def _records(plan, unit, check_overlap=True):
    """(line, record or None, reason, bytes) of one unit; a bad line raises unless skip_bad_records; a
    document sharing an n-gram with an evaluation item (--decontaminate_against) is dropped, in both
    languages: no record, reason `decontamination.OVERLAP_REASON` + its first task."""
    index = cached_index(plan.decontaminate_against, plan.decontamination_ngram) \
        if plan.decontaminate_against and check_overlap else None
    for line_number, raw in iter_raw_lines(unit.path, unit.part, unit.parts, plan.text_field):
        try:
            record = parse_line(raw, plan.text_field)
        except BadRecord as bad:
            if not plan.skip_bad_records:
                raise bad_record_error(unit.path, line_number, bad) from None
            yield line_number, None, bad.reason, len(raw)
            continue
        reason = overlap_reason(index, record[plan.text_field]) if index is not None else None
        yield line_number, (None if reason else record), reason, len(raw)


def _count_batches(plan, unit, tokenizer, batch_size=lambda: BATCH):
    """Per-line arrays of one unit, a batch at a time: lines, tokens, chars, bytes, reason (0: a record).
    `batch_size()` is asked before each batch (the English count shrinks its batches near the share)."""
    batch, size, reasons = [], batch_size(), plan.reasons

    def flush():
        texts = [record[plan.text_field] for _, record, _, _ in batch if record is not None]
        tokens = iter(count_tokens(tokenizer, texts))
        rows = {"lines": [], "tokens": [], "chars": [], "bytes": [], "reason": []}
        for line, record, reason, size in batch:
            rows["lines"].append(line)
            rows["tokens"].append(next(tokens) if record is not None else 0)
            rows["chars"].append(len(record[plan.text_field]) if record is not None else 0)
            rows["bytes"].append(size)
            rows["reason"].append(0 if record is not None else reasons.index(reason) + 1)
        batch.clear()
        return {name: np.asarray(values, dtype=np.int8 if name == "reason" else np.int64)
                for name, values in rows.items()}

    for row in _records(plan, unit):
        batch.append(row)
        if len(batch) >= size:
            yield flush()
            size = batch_size()
    if batch:
        yield flush()


def _concatenate(parts):
    names = ("lines", "tokens", "chars", "bytes", "reason")
    return {name: np.concatenate([p[name] for p in parts]) if parts else
            np.zeros(0, dtype=np.int8 if name == "reason" else np.int64) for name in names}


class CountJapanese(_Step):
    """Map: tokens, characters and bytes of every Japanese document of each unit."""

    name = "count japanese"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        folder = os.path.join(plan.cache_dir, "counts")
        tokenizer = None
        for unit in units_of_rank(plan.japanese_units, rank, world_size):
            if reuse_unit_cache(folder, unit):  # counted by a run with any task count
                self.stat_update("units_reused")
                continue
            tokenizer = tokenizer or load_tokenizer(plan.tokenizer_path)
            arrays = _concatenate(list(_count_batches(plan, unit, tokenizer)))
            self.stat_update("documents_counted", value=int((arrays["reason"] == 0).sum()))
            save_arrays(unit_cache_path(folder, unit), **arrays)


def _japanese_counts(plan, unit):
    return load_cached(unit_cache_path(os.path.join(plan.cache_dir, "counts"), unit), plan.logs("count-ja"),
                       plan.japanese_units.index(unit) % plan.tasks)


class EnglishNeed(_Step):
    """One task: the Japanese totals and the English tokens the share needs."""

    name = "english need"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        totals, skipped = {"documents": 0, "tokens": 0, "characters": 0, "bytes": 0}, Counter()
        for unit in plan.japanese_units:
            counts = _japanese_counts(plan, unit)
            good = counts["reason"] == 0
            totals["documents"] += int(good.sum())
            totals["tokens"] += int(counts["tokens"].sum())
            totals["characters"] += int(counts["chars"].sum())
            totals["bytes"] += int(counts["bytes"][good].sum())
            skipped.update(plan.reasons[code - 1] for code in counts["reason"][~good].tolist())
        if totals["tokens"] == 0:
            raise CorpusError(f"no Japanese text in {plan.japanese_paths}")
        needed = plan.english_token_share / (1 - plan.english_token_share) * totals["tokens"]
        write_json(os.path.join(os.path.dirname(plan.plan_path), "need.json"),
                   {"ja": totals, "skipped": dict(skipped), "english_tokens_needed": needed})


def _english_cache(plan, unit):
    return os.path.join(plan.cache_dir, "counts-en", f"file_{unit.file_index:05d}.npz")


def _english_state(plan, unit):
    """(tokens counted, complete) of an English file's cache, or None if it has none yet."""
    path = _english_cache(plan, unit)
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as saved:
        return int(saved["tokens"].sum()), bool(saved["complete"])


class CountEnglish(_Step):
    """English files in file order, each counted only as far as the share can need it (written as a
    map over files: with several tasks, a file stops at what the finished files before it leave)."""

    name = "count english"

    def _remaining(self, before, needed):
        """Tokens this file may still have to supply: None if a file before it already reached the
        need (incomplete: it stopped there), else the need less the finished files before it."""
        known = 0
        for unit in before:
            state = self._states.get(unit.index) or _english_state(self.plan, unit)
            if state is None:
                continue
            self._states[unit.index] = state  # a saved count never changes in this run
            tokens, complete = state
            if not complete:
                return None
            known += tokens
        return needed - known

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        needed = read_json(os.path.join(os.path.dirname(plan.plan_path), "need.json"))["english_tokens_needed"]
        units = plan.english_units
        self._states = {}
        tokenizer = None
        for position in range(rank, len(units), world_size):
            unit, before = units[position], units[:position]
            remaining = self._remaining(before, needed) if needed > 0 else None
            state = _english_state(plan, unit)
            if state is not None and (state[1] or remaining is None or state[0] >= remaining):
                self.stat_update("files_reused")  # complete, or enough for this share
                continue
            parts, counted, complete = [], 0, True
            if remaining is not None and remaining > 0:
                tokenizer = tokenizer or load_tokenizer(plan.tokenizer_path)
                documents = 0

                def batch_size():  # the documents still needed at the mean so far: a small overshoot
                    if not documents or remaining is None:
                        return 64
                    mean = max(counted / documents, 1.0)
                    return int(min(BATCH, max(16, math.ceil((remaining - counted) / mean))))

                for batch_number, arrays in enumerate(_count_batches(plan, unit, tokenizer, batch_size)):
                    parts.append(arrays)
                    counted += int(arrays["tokens"].sum())
                    documents += len(arrays["lines"])
                    if batch_number % 4 == 3:  # files before this one may have finished meanwhile
                        remaining = self._remaining(before, needed)
                    if remaining is None or counted >= remaining:
                        complete = False
                        break
            else:
                complete = False  # not needed: files before it reach the share (or the share is 0)
            arrays = _concatenate(parts)
            self.stat_update("english_tokens_counted", value=int(arrays["tokens"].sum()))
            save_arrays(_english_cache(plan, unit), **arrays, complete=np.asarray(complete))


class PlanMix(_Step):
    """One task: the last English (file, line) that reaches the share, and the bucket count."""

    name = "plan mix"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        need = read_json(os.path.join(os.path.dirname(plan.plan_path), "need.json"))
        needed = need["english_tokens_needed"]
        totals = {"ja": need["ja"], "en": {"documents": 0, "tokens": 0, "characters": 0, "bytes": 0}}
        skipped = {"ja": need["skipped"], "en": Counter()}
        en = totals["en"]
        cutoff = None  # (file_index, line) of the last English document used
        for unit in plan.english_units:
            if needed == 0 or en["tokens"] >= needed:
                break
            path = _english_cache(plan, unit)
            if not os.path.exists(path):
                raise CorpusError(f"{path}: missing; an earlier stage did not finish. Run the same command again")
            counts = load_arrays(path)
            good = counts["reason"] == 0
            lines, tokens = counts["lines"][good], counts["tokens"][good]
            running = en["tokens"] + np.cumsum(tokens)
            reach = int(np.searchsorted(running, needed, side="left"))  # first document at or past the need
            take = min(reach + 1, len(lines))
            en["documents"] += take
            en["tokens"] += int(tokens[:take].sum())
            en["characters"] += int(counts["chars"][good][:take].sum())
            en["bytes"] += int(counts["bytes"][good][:take].sum())
            used = counts["lines"] <= lines[take - 1] if take < len(lines) else np.ones(len(good), dtype=bool)
            skipped["en"].update(plan.reasons[code - 1] for code in counts["reason"][~good & used].tolist())
            if take:
                cutoff = [unit.file_index, int(lines[take - 1])]
            if en["tokens"] < needed and not bool(counts["complete"]):
                raise CorpusError(f"{path}: the English count stopped before the share was reached; delete "
                                  f"{os.path.dirname(path)} and run again")
        counted = sum(state[0] for state in map(lambda unit: _english_state(plan, unit), plan.english_units) if state)
        achieved = en["tokens"] / (totals["ja"]["tokens"] + en["tokens"])
        short = en["tokens"] < needed
        if short and not plan.allow_lower_english_share:
            raise CorpusError(
                f"the English files {plan.english_paths} hold {en['tokens']:,} tokens, fewer than the {needed:,.0f} "
                f"needed for an English share of {plan.english_token_share} (reached {achieved:.4f}); add English "
                f"files, lower --english_token_share, or pass --allow_lower_english_share to accept {achieved:.4f}")
        kept_bytes = totals["ja"]["bytes"] + en["bytes"]
        buckets = plan.shuffle_buckets or max(MIN_BUCKETS, math.ceil(kept_bytes / (plan.shuffle_bucket_mb * 2**20)))
        write_json(plan.plan_path, {
            "totals": totals, "dropped_by_reason": {side: dict(skipped[side]) for side in SIDES},
            "english_cutoff": cutoff, "english_tokens_needed": needed, "achieved": achieved, "reached": not short,
            "english_tokens_counted": counted, "kept_bytes": kept_bytes, "shuffle_buckets": buckets})


def _keep_mask(plan, unit, lines, cutoff):
    if plan.side(unit.file_index) == "ja":
        return np.ones(len(lines), dtype=bool)
    if cutoff is None or unit.file_index > cutoff[0]:
        return np.zeros(len(lines), dtype=bool)
    if unit.file_index < cutoff[0]:
        return np.ones(len(lines), dtype=bool)
    return lines <= cutoff[1]


def _scatter_base(plan, unit):
    return os.path.join(plan.tmp_dir, "scatter", f"unit_{unit.index:05d}")


class ScatterRecords(_Step):
    """Map: each kept record of a unit, with "lang", streamed to the unit's record file in read
    order; its index (key, line, offset, length), sorted by bucket then key, saved beside it."""

    name = "scatter"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        planned = read_json(plan.plan_path)
        cutoff, buckets = planned["english_cutoff"], planned["shuffle_buckets"]
        for unit in units_of_rank(plan.units, rank, world_size):
            side = plan.side(unit.file_index)
            base = _scatter_base(plan, unit)
            if side == "en" and (cutoff is None or unit.file_index > cutoff[0]):
                lines = offsets = lengths = np.zeros(0, dtype=np.int64)
                kept_lang = 0
                with atomic_output(f"{base}.jsonl"):
                    pass
            else:
                kept_lines, offsets, lengths, kept_lang, position = [], [], [], 0, 0
                # The count found the documents that overlap an evaluation item: its reason codes (one
                # row per line read, in read order) drop them here without checking their n-grams again.
                counted = (_japanese_counts(plan, unit) if side == "ja" else load_arrays(_english_cache(plan, unit))) \
                    if plan.decontaminate_against else None
                with atomic_output(f"{base}.jsonl") as stream:
                    for row, (line_number, record, _, _) in enumerate(_records(plan, unit, check_overlap=False)):
                        if side == "en" and line_number > cutoff[1] and unit.file_index == cutoff[0]:
                            break  # English past the cutoff: nothing more to read in this file
                        if record is None:
                            continue
                        if counted is not None:
                            if row >= len(counted["lines"]) or int(counted["lines"][row]) != line_number:
                                raise CorpusError(f"{unit.path}:{line_number}: not the line the count read; the file "
                                                  f"changed during the run. Run the same command again")
                            if counted["reason"][row]:
                                continue
                        if "lang" in record and not plan.overwrite_lang:
                            kept_lang += 1
                        else:
                            record["lang"] = side
                        payload = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
                        stream.write(payload)
                        kept_lines.append(line_number)
                        offsets.append(position)
                        lengths.append(len(payload))
                        position += len(payload)
                lines, offsets, lengths = (np.asarray(v, dtype=np.int64) for v in (kept_lines, offsets, lengths))
            hashes = _line_hashes(plan.seed, plan.name(unit.file_index), lines)
            bucket_of = (hashes % np.uint64(buckets)).astype(np.int64)
            order = np.lexsort((lines, hashes, bucket_of))
            for name, values in (("keys", hashes[order]), ("lines", lines[order]), ("offsets", offsets[order]),
                                 ("lengths", lengths[order])):  # memory-mapped by the shuffle
                with atomic_output(f"{base}.{name}.npy") as stream:
                    np.save(stream, values)
            save_arrays(f"{base}.npz", counts=np.bincount(bucket_of, minlength=buckets), kept_lang=np.asarray(kept_lang))
            self.stat_update("documents_scattered", value=len(lines))


def _line_hashes(seed, name, lines):
    # another stream than the selection's noise for the same seed: the key is salted with "mix"
    return line_hashes(file_key(f"mix-{seed}", name), lines)


def _raise_open_files_limit():
    """The shuffle keeps one record file open per unit: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ShuffleBuckets(_Step):
    """Map over buckets: a bucket's records from every unit, in key order, as one gzip shard."""

    name = "shuffle"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        buckets = read_json(plan.plan_path)["shuffle_buckets"]
        mine = range(rank, buckets, world_size)
        if not len(mine):
            return
        _raise_open_files_limit()
        # Per unit: the bucket counts (small, all kept); the index memory-mapped, one bucket's slice read.
        counts = [load_arrays(f"{_scatter_base(plan, u)}.npz")["counts"] for u in plan.units]
        firsts = [np.concatenate([[0], np.cumsum(c)]) for c in counts]
        files = {}
        try:
            for bucket in mine:
                keys, file_indices, lines, where = [], [], [], []
                for number, unit in enumerate(plan.units):
                    first, count = int(firsts[number][bucket]), int(counts[number][bucket])
                    if not count:
                        continue
                    base = _scatter_base(plan, unit)
                    index = {name: np.load(f"{base}.{name}.npy", mmap_mode="r") for name in
                             ("keys", "lines", "offsets", "lengths")}
                    keys.append(np.array(index["keys"][first:first + count]))
                    lines.append(np.array(index["lines"][first:first + count]))
                    file_indices.append(np.full(count, unit.file_index, dtype=np.int64))
                    where.append(np.stack([np.full(count, number, dtype=np.int64),
                                           np.array(index["offsets"][first:first + count]),
                                           np.array(index["lengths"][first:first + count])], axis=1))
                shard = os.path.join(plan.text_dir, f"{bucket:05d}.jsonl.gz")
                if not keys:
                    if os.path.exists(shard):
                        os.remove(shard)
                    continue
                where = np.concatenate(where)
                order = np.lexsort((np.concatenate(lines), np.concatenate(file_indices), np.concatenate(keys)))
                with atomic_output(shard) as stream, gzip.GzipFile(fileobj=stream, mode="wb", mtime=0,
                                                                   filename="") as out:
                    for number, offset, length in where[order].tolist():
                        if number not in files:
                            files[number] = os.open(f"{_scatter_base(plan, plan.units[number])}.jsonl", os.O_RDONLY)
                        payload = os.pread(files[number], length, offset)
                        if len(payload) != length or not payload.endswith(b"\n"):
                            raise CorpusError(f"{_scatter_base(plan, plan.units[number])}.jsonl: a record at byte "
                                              f"{offset} is cut short; delete {plan.tmp_dir} and run again")
                        out.write(payload)
                self.stat_update("documents_written", value=len(where))
        finally:
            for descriptor in files.values():
                os.close(descriptor)


class WriteMixReport(_Step):
    name = "report"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        planned = read_json(plan.plan_path)
        totals = planned["totals"]
        written = kept_lang = 0
        for unit in plan.units:
            index = load_arrays(f"{_scatter_base(plan, unit)}.npz")
            written += int(index["counts"].sum())
            kept_lang += int(index["kept_lang"])
        expected = totals["ja"]["documents"] + totals["en"]["documents"]
        if written != expected:
            raise AssertionError(f"{written} documents written to the mix, {expected} planned")
        ja, en = totals["ja"]["tokens"], totals["en"]["tokens"]
        shards = final_files(plan.text_dir)
        skipped, dropped = {}, {}  # bad lines; documents that overlap an evaluation item, per task
        for side in SIDES:
            skipped[side], dropped[side] = split_overlap_counts(planned["dropped_by_reason"][side])
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
                              "english_tokens_needed": round(planned["english_tokens_needed"]),
                              "english_tokens_counted": planned["english_tokens_counted"]},
            "shuffle": {"buckets": planned["shuffle_buckets"], "kept_bytes": planned["kept_bytes"],
                        "bucket_mb": plan.shuffle_bucket_mb, "given": plan.shuffle_buckets is not None},
            "lang_field": {"existing_kept": kept_lang, "overwrite_lang": plan.overwrite_lang},
            "skipped_bad_records": skipped,
            "decontamination": {"against": list(plan.decontaminate_against), "ngram": plan.decontamination_ngram,
                                "documents_dropped_per_task": dropped} if plan.decontaminate_against else None,
        })


class TokenizeMixShards(_Step):
    """Map over buckets: text shard b -> token shard b of one tokenizer (`toolkit.token_shards`), so
    the files do not depend on the task count. A shard whose counts file exists is done (resume)."""

    name = "tokenize mix shards"

    def __init__(self, plan, tokenizer_step):
        super().__init__(plan)
        self.tokenizer_step = tokenizer_step

    def run(self, data=None, rank=0, world_size=1):
        from datatrove.data import Document

        from toolkit.token_shards import COUNTS_FOLDER

        plan, step = self.plan, self.tokenizer_step
        for bucket in range(rank, plan.buckets(), world_size):
            if step.output_folder.exists(f"{COUNTS_FOLDER}/{bucket:05d}.json"):
                continue
            shard = os.path.join(plan.text_dir, f"{bucket:05d}.jsonl.gz")

            def documents(shard=shard):
                if not os.path.exists(shard):  # an empty bucket
                    return
                with gzip.open(shard, "rb") as stream:
                    for line_number, raw in enumerate(stream, start=1):
                        yield Document(text=json.loads(raw)[plan.text_field], id=f"{shard}:{line_number}")

            step.write_shard(documents(), bucket)
            self.stat_update("shards_tokenized")
        return
        yield


class FinalizeMixTokens(_Step):
    """One task: the token shards' manifest, once every bucket's shard is counted."""

    name = "token shard manifest"

    def __init__(self, plan, folder):
        super().__init__(plan)
        self.folder = folder

    def run(self, data=None, rank=0, world_size=1):
        from toolkit.token_shards import finalize_token_shards

        finalize_token_shards(self.folder, self.plan.buckets())
        return
        yield


def remove_temporary(plan):
    shutil.rmtree(plan.tmp_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the .tmp folder itself, once no other mix uses it
        os.rmdir(os.path.dirname(plan.tmp_dir))
