"""DSIR importance resampling that works for Japanese, as datatrove stages that run anywhere.

The method is the `data-selection` package's (`HashedNgramDSIR`: fit bag-of-hashed-n-gram
distributions of a raw pool and of a target sample, weight each raw document by their
likelihood ratio, draw K without replacement by Gumbel top-k), with four changes:

- Features. `featurizer="japanese_char_ngrams"` (default) hashes 1..n-grams of units of
  NFKC-normalised, lowercased, whitespace-collapsed text: a unit is a character, except
  that a run of ASCII letters/digits is one unit (a word). The package's word/punctuation
  regex turns a whole Japanese clause into one "word"; characters are the unit that works.
  Hashing is vectorised numpy over code points (polynomial hashes modulo 2**64 and a
  multiply-shift, deterministic across processes and machines, never Python's salted
  `hash()`), on batches of documents at once.
  `featurizer="dsir_default"` keeps the package's own featurizer, for comparison.
- Fitting uses the same features as scoring (the package fits with `get_ngram_counts`
  whatever its featurizer).
- Smoothing: p = (count + alpha) / (total + alpha * num_buckets) for raw and target, so a
  bucket the small target sample never hit gives a bounded penalty instead of log(1e-8).
- Length filter in characters (`min_example_chars`), after normalisation, instead of the
  package's `min_example_length` in "words" (which still applies to `dsir_default`).

The passes are datatrove pipeline steps (see `selection_stages`), so one machine or a
Slurm/Ray cluster runs the same code:

    count (map)  -> fit (1 task) -> score (map) -> draw (map) -> merge (1 task) -> write (map) -> report (1 task)

The fit sees every file: the n-gram budget is split evenly across the raw files. A
document's Gumbel noise is a hash of (seed, file, line), and every tie is broken by
(file, line), so the selected set is the same for any number of tasks, workers and
executor. `--decontaminate_against` drops, before the fit, every raw document sharing a
character n-gram with an evaluation item (`toolkit.decontamination`).
"""

import gzip
import os
import shutil
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from datatrove.pipeline.base import PipelineStep

from toolkit.corpus import BadRecord, CorpusError, bad_record_error, parse_line
from toolkit.data_engine import (Stage, WorkUnit, atomic_output, file_key, hash_to_uniform, iter_raw_lines, load_cached,
                                 read_json, reuse_unit_cache, save_arrays, unit_cache_path, units_of_rank, write_json)

FEATURIZERS = ("japanese_char_ngrams", "dsir_default")
# 2**16 buckets for character n-grams (Japanese alone has thousands of distinct characters);
# the package's 10000 for its own featurizer.
DEFAULT_BUCKETS = {"japanese_char_ngrams": 2**16, "dsir_default": 10000}

# Per-line status codes kept in the cache.
CANDIDATE, TOO_SHORT, TOO_FEW_WORDS, CONTAMINATED = 0, 1, 2, 3
FILTER_REASONS = {TOO_SHORT: "too_short_chars", TOO_FEW_WORDS: "too_few_words", CONTAMINATED: "contaminated"}
BAD_REASONS = ("blank_line", "invalid_utf8", "malformed_json", "not_an_object", "missing_text", "text_not_string",
               "lone_surrogate")
BAD_CODE = {reason: 10 + index for index, reason in enumerate(BAD_REASONS)}
CODE_REASON = {**FILTER_REASONS, **{code: reason for reason, code in BAD_CODE.items()}}
BATCH = 512  # documents featurised together (speed only: no result depends on it)

_K_CHAIN = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial chain over code points
_K_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_K_MIX2 = np.uint64(0x94D049BB133111EB)
_S29, _S32 = np.uint64(29), np.uint64(32)


def normalize_text(text: str) -> str:
    """NFKC (full-width ASCII -> ASCII, half-width kana -> kana), lowercase, whitespace runs -> one space."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


_POWERS = {"k": np.ones(1, dtype=np.uint64), "inverse": np.ones(1, dtype=np.uint64)}
_K_INVERSE = np.uint64(pow(int(_K_CHAIN), -1, 2**64))


def _powers(n):
    """K**j and K**-j modulo 2**64 for j < n (cached, grown by doubling)."""
    if len(_POWERS["k"]) < n:
        size = max(n, 2 * len(_POWERS["k"]))
        for key, base in (("k", _K_CHAIN), ("inverse", _K_INVERSE)):
            table = np.full(size, base, dtype=np.uint64)
            table[0] = 1
            _POWERS[key] = np.multiply.accumulate(table)  # wraps modulo 2**64
    return _POWERS["k"][:n], _POWERS["inverse"][:n]


def _units(codes, starts, lengths, latin_words):
    """The units n-grams are made of, and how many each document has.

    Every character is a unit (spaces included) unless `latin_words`: then spaces are not
    units and each run of ASCII letters, digits and "_" is ONE unit (a word), hashed as a
    polynomial of its code points; kana, kanji and punctuation stay one unit each.
    """
    if not latin_words:
        return codes, lengths
    total = len(codes)
    word = ((codes >= 97) & (codes <= 122)) | ((codes >= 48) & (codes <= 57)) | (codes == 95)
    space = codes == 32
    continues = np.zeros(total, dtype=bool)
    continues[1:] = word[1:] & word[:-1]
    continues[starts[lengths > 0]] = False  # a run never continues into the next document
    positions = np.flatnonzero(~space & ~continues)
    k_powers, inverse_powers = _powers(total)
    weighted = codes * inverse_powers
    weighted[space] = 0
    # sum over each unit's characters of c_j K^-j, times K^start: sum of c_j K^-(j - start)
    sums = np.add.reduceat(weighted, positions) if len(positions) else np.zeros(0, dtype=np.uint64)
    units = sums * k_powers[positions]
    owners = np.searchsorted(np.cumsum(lengths), positions, side="right")
    return units, np.bincount(owners, minlength=len(lengths)).astype(np.int64)


def char_ngram_buckets(normalized_texts, ngrams=3, num_buckets=10000, latin_words=True):
    """Hashed 1..`ngrams`-grams of already normalised texts, all documents at once.

    Units are characters, except that with `latin_words` a run of ASCII letters/digits is
    one unit and spaces are none (`_units`), so Japanese gets character n-grams and the
    commands, names and English words inside it stay whole words, as the package sees them.
    Returns (buckets, starts, lengths) in units: `buckets[n - 1]` is an int64 array over
    every unit of the concatenated texts, holding the bucket of the n-gram that starts
    there, or `num_buckets` (a "no n-gram" sentinel) where it would run past the end of
    its document. The hash is a polynomial over code points modulo 2**64 (numpy uint64
    wraps), salted with n and mixed, then reduced to [0, num_buckets) by a multiply-shift:
    the same on every process and machine, unlike Python's `hash()`.
    """
    if num_buckets >= 2**32:
        raise ValueError("num_buckets must be below 2**32")
    char_lengths = np.fromiter(map(len, normalized_texts), dtype=np.int64, count=len(normalized_texts))
    joined = "".join(normalized_texts).encode("utf-32-le", errors="surrogatepass")
    codes = np.frombuffer(joined, dtype=np.uint32).astype(np.uint64)
    units, lengths = _units(codes, np.cumsum(char_lengths) - char_lengths, char_lengths, latin_words)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = len(units)
    buckets, chain = [], units
    for n in range(1, ngrams + 1):
        if n > 1:
            chain = chain[:-1] * _K_CHAIN
            chain += units[n - 1:]
        mixed = chain ^ np.uint64(n)
        mixed *= _K_MIX1
        mixed ^= mixed >> _S29
        mixed *= _K_MIX2
        mixed >>= _S32
        mixed *= np.uint64(num_buckets)
        mixed >>= _S32
        bucket = np.full(total, num_buckets, dtype=np.int64)
        bucket[: len(mixed)] = mixed
        for k in range(1, n):  # the n-gram starting k units before a document's end crosses it
            crossing = ends[lengths >= k] - k
            bucket[crossing] = num_buckets
        buckets.append(bucket)
    return buckets, starts, lengths


def char_ngram_counts(normalized_texts, ngrams, num_buckets, latin_words=True) -> np.ndarray:
    """Bucket counts summed over the texts (what fitting needs)."""
    buckets, _, _ = char_ngram_buckets(normalized_texts, ngrams, num_buckets, latin_words)
    counts = np.zeros(num_buckets + 1, dtype=np.int64)
    for bucket in buckets:
        counts += np.bincount(bucket, minlength=num_buckets + 1)
    return counts[:num_buckets]


def char_ngram_scores(normalized_texts, log_diff, ngrams, latin_words=True) -> np.ndarray:
    """log_diff . (bucket counts of each text), without building the count vectors."""
    buckets, starts, lengths = char_ngram_buckets(normalized_texts, ngrams, len(log_diff), latin_words)
    if len(normalized_texts) == 0:
        return np.zeros(0)
    weights = np.append(np.asarray(log_diff, dtype=np.float64), 0.0)  # the sentinel scores 0
    scores = np.zeros(len(normalized_texts))
    total = int(lengths.sum())
    for bucket in buckets:
        values = np.zeros(total + 1)
        values[:total] = weights[bucket]
        scores += np.add.reduceat(values, starts)
    scores[lengths == 0] = 0.0  # reduceat gives the next document's first value for an empty one
    return scores




class Featurizer:
    """The features, length filter and scores of one selection setting, on batches of texts."""

    def __init__(self, featurizer="japanese_char_ngrams", ngrams=3, num_buckets=None, min_example_chars=100,
                 min_example_length=100, latin_words=True):
        if featurizer not in FEATURIZERS:
            raise ValueError(f"featurizer {featurizer!r} is not one of {FEATURIZERS}")
        self.name = featurizer
        self.ngrams = ngrams if featurizer == "japanese_char_ngrams" else 2
        self.num_buckets = num_buckets or DEFAULT_BUCKETS[featurizer]
        self.min_example_chars = min_example_chars
        self.min_example_length = min_example_length
        self.latin_words = latin_words
        if featurizer == "dsir_default":  # imported only when used: nltk + scipy take seconds to import
            from data_selection.hashed_ngram_dsir import get_ngram_counts, wpt

            self._package_counts, self._words = get_ngram_counts, wpt.tokenize

    def prepare(self, texts):
        """(features, lengths, words): the normalised texts (japanese_char_ngrams) or one count
        vector per text (dsir_default); characters after normalisation (the filter's unit); the
        package's word count per text (dsir_default only, else None)."""
        normalized = [normalize_text(text) for text in texts]
        lengths = np.fromiter(map(len, normalized), dtype=np.int64, count=len(normalized))
        if self.name == "japanese_char_ngrams":
            return normalized, lengths, None
        counts = [self._package_counts(text, n=self.ngrams, num_buckets=self.num_buckets, tokenizer=self._words)
                  for text in texts]
        remainder = self.ngrams * (self.ngrams - 1) / 2  # the package's get_perexample_metadata
        words = np.asarray([(c.sum() + remainder) // self.ngrams for c in counts])
        return counts, lengths, words

    def filter_status(self, lengths, words, apply_filter=True):
        status = np.full(len(lengths), CANDIDATE, dtype=np.int8)
        if apply_filter:
            status[lengths < self.min_example_chars] = TOO_SHORT
            if words is not None:
                status[(words < self.min_example_length) & (status == CANDIDATE)] = TOO_FEW_WORDS
        return status

    def counts(self, features) -> np.ndarray:
        """Bucket counts summed over the texts (fitting)."""
        if self.name == "japanese_char_ngrams":
            return char_ngram_counts(features, self.ngrams, self.num_buckets, self.latin_words)
        return np.sum(features, axis=0) if len(features) else np.zeros(self.num_buckets, dtype=np.int64)

    def ngrams_per_text(self, features) -> np.ndarray:
        """How many n-grams each text adds to the counts (the fit budget's unit)."""
        if self.name == "dsir_default":
            return np.asarray([int(c.sum()) for c in features], dtype=np.int64)
        _, _, units = char_ngram_buckets(features, 1, 2, self.latin_words)
        return sum(np.maximum(units - n + 1, 0) for n in range(1, self.ngrams + 1))

    def scores(self, features, log_diff) -> np.ndarray:
        """log_diff . counts of each text (the log importance weight), in float64."""
        if self.name == "japanese_char_ngrams":
            return char_ngram_scores(features, log_diff, self.ngrams, self.latin_words)
        return np.asarray([float(log_diff @ np.asarray(c, dtype=np.float64)) for c in features])

    def featurize(self, text) -> np.ndarray:
        """The package's per-document API: one count vector over the buckets."""
        features, _, _ = self.prepare([text])
        return self.counts(features)


def selection_settings(featurizer, ngrams, num_buckets, min_example_chars, min_example_length, smoothing_alpha,
                       text_field="text", latin_words=True) -> dict:
    default = featurizer == "dsir_default"
    return {
        "featurizer": featurizer,
        "ngrams": 2 if default else ngrams,
        "num_buckets": num_buckets or DEFAULT_BUCKETS[featurizer],
        "min_example_chars": min_example_chars,
        "min_example_length_words": min_example_length if default else None,
        "smoothing_alpha": smoothing_alpha,
        "latin_words": None if default else latin_words,
        "text_field": text_field,
        "normalisation": "the package's (lowercase, WordPunct words)" if default
        else "NFKC, lowercase, whitespace runs -> one space",
    }


def smoothed_probs(counts, alpha):
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + alpha) / (counts.sum() + alpha * len(counts))


# ----- the configuration every stage reads ---------------------------------------------------
@dataclass
class SelectionPlan:
    """Everything the stages need (pickled into each task: paths and settings, no data)."""

    raw_paths: list
    target_paths: list
    units: list  # data_engine.WorkUnit
    tasks: int
    featurizer: dict  # Featurizer(**featurizer)
    smoothing_alpha: float
    text_field: str
    skip_bad_records: bool
    num_ngrams_to_fit: int | None  # None: all
    decontaminate_against: list
    decontamination_ngram: int
    num_to_sample: int
    seed: int
    top_k: bool
    fit_dir: str  # counts, estimator, scores: reused by any draw with the same inputs and settings
    draw_dir: str  # this seed and K
    output_dir: str
    report: dict = field(default_factory=dict)  # inputs and settings for the report
    raw_names: list = None  # data_engine.canonical_name of each raw file: the key of its Gumbel noise

    @property
    def selected_dir(self):
        return os.path.join(self.output_dir, "selected")

    @property
    def count_units(self):
        """Units of the count stage. Under an n-gram budget each file is counted whole, in line
        order, up to its share, so the documents fitted never depend on the number of tasks."""
        if self.num_ngrams_to_fit is None:
            return self.units
        return [WorkUnit(index, index, path) for index, path in enumerate(self.raw_paths)]

    def stage_logs(self, stage):
        """The logging folder (with the completion markers) of a stage. The markers are per task, so
        they are per task count; the cached results they stand for are per file and part."""
        if stage in FIT_STAGES:
            return os.path.join(self.fit_dir, "logs", f"tasks_{self.tasks}", stage)
        return os.path.join(self.draw_dir, "logs", stage)

    def noise_name(self, file_index):
        return self.raw_names[file_index] if self.raw_names else self.raw_paths[file_index]

    @property
    def fitted(self):
        """The estimator is saved (by any task count): counting and fitting are done."""
        return os.path.exists(os.path.join(self.fit_dir, "fit.json")) and \
            os.path.exists(os.path.join(self.fit_dir, "estimator.npz"))

    def make_featurizer(self):
        return Featurizer(**self.featurizer)


FIT_STAGES, DRAW_STAGES = ("count", "fit", "score"), ("draw", "merge", "write", "report")


def selection_stages(plan: SelectionPlan) -> list:
    """The stages in order. count/fit/score keep their outputs and completion markers under the
    fit folder (reused by any seed and K), the draw stages under the draw folder."""
    steps = {"count": (CountNgrams, plan.tasks), "fit": (FitEstimator, 1), "score": (ScoreDocuments, plan.tasks),
             "draw": (DrawTopK, plan.tasks), "merge": (MergeDraw, 1), "write": (WriteSelected, plan.tasks),
             "report": (WriteReport, 1)}
    return [Stage(name, [step(plan)], tasks, plan.stage_logs(name)) for name, (step, tasks) in steps.items()]


class _Step(PipelineStep):
    type = "🎯 DSIR"

    def __init__(self, plan):
        super().__init__()
        self.plan = plan


def _documents(plan, unit, featurizer, decontamination, apply_filter=True):
    """Batches of one unit: (lines, status, lengths, features of the candidates, contaminated task lists)."""
    lines, raws = [], []

    def flush():
        status = np.full(len(raws), CANDIDATE, dtype=np.int8)
        texts, positions = [], []
        for offset, raw in enumerate(raws):
            try:
                record = parse_line(raw, plan.text_field)
            except BadRecord as bad:
                if not plan.skip_bad_records:
                    raise bad_record_error(unit.path, lines[offset], bad) from None
                status[offset] = BAD_CODE[bad.reason]
                continue
            texts.append(record[plan.text_field])
            positions.append(offset)
        positions = np.asarray(positions, dtype=np.int64)
        features, lengths, words = featurizer.prepare(texts)
        chars = np.zeros(len(raws), dtype=np.int64)
        chars[positions] = lengths
        status[positions] = featurizer.filter_status(lengths, words, apply_filter)
        overlaps = []
        if decontamination is not None:
            candidate = np.flatnonzero(status[positions] == CANDIDATE)
            found = decontamination.overlapping_tasks([texts[i] for i in candidate])
            for index, tasks in zip(candidate, found):
                if tasks:
                    status[positions[index]] = CONTAMINATED
                    overlaps.append(tasks)
        keep = status[positions] == CANDIDATE
        kept = [f for f, k in zip(features, keep) if k]
        return np.asarray(lines, dtype=np.int64), status, chars, kept, overlaps

    for line_number, raw in iter_raw_lines(unit.path, unit.part, unit.parts, plan.text_field):
        lines.append(line_number)
        raws.append(raw)
        if len(raws) >= BATCH:
            yield flush()
            lines, raws = [], []
    if raws:
        yield flush()


def _decontamination(plan):
    if not plan.decontaminate_against:
        return None
    from toolkit.decontamination import EvalNgramIndex

    return EvalNgramIndex.from_files(plan.decontaminate_against, plan.decontamination_ngram)


def _unit_budget(plan, unit):
    """The n-gram budget is split evenly across files, so the fit sees every file."""
    if plan.num_ngrams_to_fit is None:
        return None
    return -(-plan.num_ngrams_to_fit // len(plan.raw_paths))


class CountNgrams(_Step):
    """Map: bucket counts of the candidate documents of each unit, up to its share of the budget."""

    name = "count n-grams"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        if plan.fitted:  # fitted by an earlier run with another task count
            return
        featurizer, decontamination = plan.make_featurizer(), _decontamination(plan)
        for unit in units_of_rank(plan.count_units, rank, world_size):
            if os.path.exists(unit_cache_path(os.path.join(plan.fit_dir, "counts"), unit)):
                continue
            budget = _unit_budget(plan, unit)
            counts = np.zeros(featurizer.num_buckets, dtype=np.int64)
            documents = ngrams = 0
            stopped = False
            for _, _, chars, features, _ in _documents(plan, unit, featurizer, decontamination):
                # n-grams per text only when this batch may cross the budget (a text of c
                # characters has at most ngrams x c n-grams); else the counts' sum says it
                if budget is not None and len(features) and ngrams + featurizer.ngrams * int(chars.sum()) >= budget:
                    per_text = featurizer.ngrams_per_text(features)
                    if per_text.sum() >= budget - ngrams:  # up to and including the document reaching the share
                        take = int(np.searchsorted(np.cumsum(per_text), budget - ngrams, side="left")) + 1
                        features, stopped = features[:take], True
                batch_counts = featurizer.counts(features)
                counts += batch_counts
                documents += len(features)
                ngrams += int(batch_counts.sum())
                self.stat_update("documents_fitted", value=len(features))
                if stopped:
                    break
            save_arrays(unit_cache_path(os.path.join(plan.fit_dir, "counts"), unit), counts=counts,
                        stats=np.asarray([documents, ngrams, int(stopped)]))


class FitEstimator(_Step):
    """One task: sum the raw counts, count the target, fit the smoothed log ratio."""

    name = "fit estimator"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        if plan.fitted:
            return
        featurizer = plan.make_featurizer()
        raw_counts = np.zeros(featurizer.num_buckets, dtype=np.int64)
        per_file = [{"path": path, "documents_fitted": 0, "ngrams_fitted": 0, "stopped_at_budget": False}
                    for path in plan.raw_paths]
        for unit in plan.count_units:
            saved = load_cached(unit_cache_path(os.path.join(plan.fit_dir, "counts"), unit),
                                plan.stage_logs("count"), unit.index % plan.tasks)
            raw_counts += saved["counts"]
            documents, ngrams, stopped = (int(v) for v in saved["stats"])
            row = per_file[unit.file_index]
            row["documents_fitted"] += documents
            row["ngrams_fitted"] += ngrams
            row["stopped_at_budget"] = row["stopped_at_budget"] or bool(stopped)
        if raw_counts.sum() == 0:
            raise CorpusError(f"no raw document passed the filters to fit on in {plan.raw_paths}; lower "
                              f"--min_example_chars or check --text_field")
        target_counts = np.zeros(featurizer.num_buckets, dtype=np.int64)
        target_stats = Counter()
        for index, path in enumerate(plan.target_paths):
            unit = WorkUnit(index, index, path)
            for _, status, chars, features, _ in _documents(plan, unit, featurizer, None, apply_filter=False):
                target_counts += featurizer.counts(features)
                target_stats["documents"] += len(features)
                target_stats["characters"] += int(chars.sum())
                target_stats.update(CODE_REASON[c] for c in status.tolist() if c != CANDIDATE)
        if target_counts.sum() == 0:
            raise CorpusError(f"the target datasets {plan.target_paths} contain no text to fit on")
        log_diff = np.log(smoothed_probs(target_counts, plan.smoothing_alpha)) - np.log(
            smoothed_probs(raw_counts, plan.smoothing_alpha))
        save_arrays(os.path.join(plan.fit_dir, "estimator.npz"), raw_counts=raw_counts, target_counts=target_counts,
                    log_diff=log_diff)
        write_json(os.path.join(plan.fit_dir, "fit.json"), {"per_file": per_file, "target": dict(target_stats)})


class ScoreDocuments(_Step):
    """Map: log importance weight, status and characters of every line of each unit."""

    name = "score documents"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        featurizer, decontamination = plan.make_featurizer(), _decontamination(plan)
        log_diff = None
        for unit in units_of_rank(plan.units, rank, world_size):
            if reuse_unit_cache(os.path.join(plan.fit_dir, "scores"), unit):  # scored by any task count
                self.stat_update("units_reused")
                continue
            if log_diff is None:
                log_diff = load_cached(os.path.join(plan.fit_dir, "estimator.npz"), plan.stage_logs("fit"), 0)["log_diff"]
            parts = {"lines": [], "status": [], "chars": [], "weights": [], "overlaps": []}
            for lines, status, chars, features, overlaps in _documents(plan, unit, featurizer, decontamination):
                weights = np.full(len(lines), np.nan)
                weights[status == CANDIDATE] = featurizer.scores(features, log_diff)
                tasks = np.full(len(lines), "", dtype=object)
                tasks[status == CONTAMINATED] = ["\n".join(sorted(found)) for found in overlaps]
                for name, values in zip(parts, (lines, status, chars, weights, tasks)):
                    parts[name].append(values)
                self.stat_update("documents_scored", value=len(lines))
            arrays = {name: np.concatenate(values) for name, values in parts.items()}
            # per line, so that another split can be cut from it: the evaluation tasks a document overlaps
            arrays["overlaps"] = arrays["overlaps"].astype(str) if len(arrays["overlaps"]) else np.zeros(0, dtype="<U1")
            save_arrays(unit_cache_path(os.path.join(plan.fit_dir, "scores"), unit), **arrays)


def _sort_keys(keys, file_indices, lines):
    """Order: highest key first, ties by (file, line): the same total order in every task."""
    return np.lexsort((lines, file_indices, -keys))


def _draw_keys(plan, unit, weights, lines):
    """log weight + Gumbel noise of (seed, file, line), or the log weight alone with --top_k.
    The draw and the write stage both call this: the same float64 operations, the same bits."""
    if plan.top_k:
        return weights.copy()
    return weights + -np.log(-np.log(hash_to_uniform(file_key(plan.seed, plan.noise_name(unit.file_index)), lines)))


def _candidates(plan, unit):
    scores = load_cached(unit_cache_path(os.path.join(plan.fit_dir, "scores"), unit), plan.stage_logs("score"),
                         unit.index % plan.tasks)
    candidate = scores["status"] == CANDIDATE
    return scores, candidate, scores["weights"][candidate], scores["lines"][candidate]


class DrawTopK(_Step):
    """Map: each task's own top K of the draw keys, saved in the global order (as -key ascending,
    memory-mappable), so that the merge can find the K-th key without loading them."""

    name = "draw top-k"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        columns = {"keys": [], "files": [], "lines": []}
        for unit in units_of_rank(plan.units, rank, world_size):
            _, _, weights, lines = _candidates(plan, unit)
            columns["keys"].append(_draw_keys(plan, unit, weights, lines))
            columns["files"].append(np.full(len(lines), unit.file_index, dtype=np.int64))
            columns["lines"].append(lines)
            if sum(map(len, columns["keys"])) > 4 * plan.num_to_sample:  # memory: O(K) per task
                columns = {name: [values] for name, values in _top(columns, plan.num_to_sample).items()}
        top = _top(columns, plan.num_to_sample)
        folder = os.path.join(plan.draw_dir, "draw")
        for name, values in (("neg_keys", -top["keys"]), ("files", top["files"]), ("lines", top["lines"])):
            with atomic_output(os.path.join(folder, f"task_{rank:05d}.{name}.npy")) as stream:
                np.save(stream, values)


def _top(columns, k):
    """The first k rows in `_sort_keys` order of lists of column arrays."""
    merged = {name: np.concatenate(values) if values else np.zeros(0, dtype=np.float64 if name == "keys" else np.int64)
              for name, values in columns.items()}
    order = _sort_keys(merged["keys"], merged["files"], merged["lines"])[:k]
    return {name: values[order] for name, values in merged.items()}


def _load_draw(plan, task, name):
    return load_cached(os.path.join(plan.draw_dir, "draw", f"task_{task:05d}.{name}.npy"), plan.stage_logs("draw"),
                       task, mmap_mode="r")


def kth_smallest(sorted_arrays, k) -> float:
    """The k-th smallest value (k from 1) across ascending arrays, by bisection over values:
    each probe is one searchsorted per array, so memory-mapped arrays are never loaded."""
    count_le = lambda value: sum(int(np.searchsorted(a, value, side="right")) for a in sorted_arrays)  # noqa: E731
    low = min(float(a[0]) for a in sorted_arrays if len(a))  # count_le(high) >= k, and the answer is in [low, high]
    high = max(float(a[min(k, len(a)) - 1]) for a in sorted_arrays if len(a))
    if count_le(low) >= k:
        return low
    while True:  # invariant: count_le(low) < k <= count_le(high)
        middle = low + (high - low) / 2
        if middle <= low or middle >= high:  # adjacent floats: high is a value of the arrays
            return high
        if count_le(middle) >= k:
            high = middle
        else:
            low = middle


class MergeDraw(_Step):
    """One task: the global threshold of the draw (the K-th key and, among keys equal to it, the
    last (file, line) taken) and the accounting, streaming over the score files."""

    name = "merge draw"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        reasons, contaminated = Counter(), Counter()
        per_file = [{"path": path, "read": 0} for path in plan.raw_paths]
        read = candidates = characters_read = characters_candidates = 0
        low, high = np.inf, -np.inf
        for unit in plan.units:
            scores, candidate, weights, _ = _candidates(plan, unit)
            status = scores["status"]
            read += len(status)
            per_file[unit.file_index]["read"] += len(status)
            reasons.update(CODE_REASON[c] for c in status[~candidate].tolist())
            candidates += int(candidate.sum())
            characters_read += int(scores["chars"].sum())
            characters_candidates += int(scores["chars"][candidate].sum())
            contaminated.update(task for found in scores["overlaps"][status == CONTAMINATED].tolist()
                                for task in found.split("\n") if task)
            if len(weights):
                low, high = min(low, weights.min()), max(high, weights.max())
        if plan.num_to_sample > candidates:
            raise CorpusError(
                f"--num_to_sample {plan.num_to_sample} is more than the {candidates} documents that passed the filters "
                f"(of {read} read); lower it, add raw data, or lower --min_example_chars (the scores are cached: "
                f"the rerun takes seconds)")
        neg_keys = [_load_draw(plan, task, "neg_keys") for task in range(plan.tasks)]
        threshold = kth_smallest(neg_keys, plan.num_to_sample)  # -(K-th largest key)
        above = sum(int(np.searchsorted(a, threshold, side="left")) for a in neg_keys)
        tied = []
        for task, keys in enumerate(neg_keys):
            start, end = np.searchsorted(keys, threshold, side="left"), np.searchsorted(keys, threshold, side="right")
            if end > start:
                tied.append(np.stack([_load_draw(plan, task, "files")[start:end],
                                      _load_draw(plan, task, "lines")[start:end]], axis=1))
        tied = np.concatenate(tied)
        tied = tied[np.lexsort((tied[:, 1], tied[:, 0]))]
        last_tied = tied[plan.num_to_sample - above - 1].tolist()  # ties taken in (file, line) order
        edges = np.linspace(low, high if high > low else low + 1, HISTOGRAM_BINS + 1)
        histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        for unit in plan.units:
            histogram += np.histogram(_candidates(plan, unit)[2], bins=edges)[0]
        shutil.rmtree(plan.selected_dir, ignore_errors=True)  # a fresh output folder for this draw
        write_json(os.path.join(plan.draw_dir, "merge.json"), {
            "threshold": {"neg_key": threshold, "last_tied": last_tied, "above": above, "tied": len(tied)},
            "documents": {"read": read, "filtered": dict(sorted(reasons.items())),
                          "filtered_total": int(sum(reasons.values())), "candidates": candidates,
                          "selected": plan.num_to_sample, "not_selected": candidates - plan.num_to_sample},
            "characters": {"read": characters_read, "candidates": characters_candidates},
            "per_file": per_file,
            "contaminated_documents_per_task": dict(sorted(contaminated.items())),
            "histogram": {"edges": edges.tolist(), "candidates": histogram.tolist()},
        })


HISTOGRAM_BINS = 600  # the weight quantiles come from it; the plot sums it 10 bins at a time


def shard_name(file_index):
    return f"{file_index:05d}.jsonl.gz"


def is_selected(keys, file_index, lines, threshold):
    """The draw's rule: key above the K-th key, or equal to it and at or before the last tied (file, line)."""
    negative = -keys
    at = negative == threshold["neg_key"]
    last_file, last_line = threshold["last_tied"]
    return (negative < threshold["neg_key"]) | (at & ((file_index < last_file) |
                                                     ((file_index == last_file) & (lines <= last_line))))


class WriteSelected(_Step):
    """Map over files: the selected lines of each raw file, byte for byte, as one gzip shard
    (named by the file's index, so the output is the same whatever the number of tasks)."""

    name = "write selected"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        merge = read_json(os.path.join(plan.draw_dir, "merge.json"))
        edges = np.asarray(merge["histogram"]["edges"])
        written = {}
        for file_index in range(rank, len(plan.raw_paths), world_size):
            chosen, weights, chars = [], [], []
            for unit in plan.units:
                if unit.file_index != file_index:
                    continue
                scores, candidate, unit_weights, lines = _candidates(plan, unit)
                mask = is_selected(_draw_keys(plan, unit, unit_weights, lines), file_index, lines, merge["threshold"])
                chosen.append(lines[mask])
                weights.append(unit_weights[mask])
                chars.append(scores["chars"][candidate][mask])
            wanted = set(np.concatenate(chosen).tolist())
            count = 0
            if wanted:
                shard = os.path.join(plan.selected_dir, shard_name(file_index))
                with atomic_output(shard) as stream, gzip.GzipFile(fileobj=stream, mode="wb", mtime=0, filename="") as out:
                    for line_number, raw in iter_raw_lines(plan.raw_paths[file_index], text_field=plan.text_field):
                        if line_number in wanted:  # byte for byte (CR LF kept); a last line gets its newline
                            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                            count += 1
            if count != len(wanted):
                raise CorpusError(f"{plan.raw_paths[file_index]}: {count} lines written but {len(wanted)} selected; "
                                  f"the file changed since it was scored: delete {plan.fit_dir} and run again")
            written[file_index] = {"selected": count, "characters_selected": int(np.concatenate(chars).sum()),
                                   "histogram": np.histogram(np.concatenate(weights), bins=edges)[0].tolist()}
            self.stat_update("documents_written", value=count)
        write_json(os.path.join(plan.draw_dir, "written", f"task_{rank:05d}.json"), written)


def _quantiles(histogram, edges, quantiles=(5, 50, 95)):
    """Percentiles read off a histogram (linear within a bin): exact to a bin's width."""
    cumulative = np.concatenate([[0], np.cumsum(histogram)])
    return {f"p{q}": round(float(np.interp(q / 100 * cumulative[-1], cumulative, edges)), 3) for q in quantiles}


class WriteReport(_Step):
    """One task: selection_report.json (every document accounted for) and the weight histogram."""

    name = "report"

    def run(self, data=None, rank=0, world_size=1):
        plan = self.plan
        merge = read_json(os.path.join(plan.draw_dir, "merge.json"))
        fit = read_json(os.path.join(plan.fit_dir, "fit.json"))
        written = {}
        for task in range(plan.tasks):
            written.update({int(k): v for k, v in read_json(os.path.join(plan.draw_dir, "written", f"task_{task:05d}.json")).items()})
        documents = merge["documents"]
        selected_total = sum(row["selected"] for row in written.values())
        if selected_total != documents["selected"] or \
                documents["read"] != documents["selected"] + documents["filtered_total"] + documents["not_selected"]:
            raise AssertionError(f"document accounting does not add up: {documents}, {selected_total} written")
        per_file = []
        for index, row in enumerate(merge["per_file"]):
            fitted, done = fit["per_file"][index], written[index]
            per_file.append({**row, "selected": done["selected"], "characters_selected": done["characters_selected"],
                             "shard": shard_name(index) if done["selected"] else None,
                             "documents_fitted": fitted["documents_fitted"], "ngrams_fitted": fitted["ngrams_fitted"],
                             "fit_stopped_at_budget": fitted["stopped_at_budget"]})
        edges = np.asarray(merge["histogram"]["edges"])
        histograms = {"candidates": np.asarray(merge["histogram"]["candidates"]),
                      "selected": np.sum([done["histogram"] for done in written.values()], axis=0)}
        report = {
            "stage": "select",
            **plan.report,
            "output": {"selected_dir": plan.selected_dir,
                       "selected_files": [os.path.join(plan.selected_dir, shard_name(i))
                                          for i, row in enumerate(per_file) if row["selected"]],
                       "cache_dir": plan.fit_dir, "plot": os.path.join(plan.output_dir, "log_importance_weights.png")},
            "documents": documents,
            "documents_per_file": per_file,
            "characters": {"unit": "characters after NFKC + whitespace normalisation", **merge["characters"],
                           "selected": sum(row["characters_selected"] for row in per_file)},
            "fit": {"documents": sum(r["documents_fitted"] for r in per_file),
                    "ngrams": sum(r["ngrams_fitted"] for r in per_file),
                    "budget": plan.num_ngrams_to_fit},
            "target": fit["target"],
            "decontamination": {"against": plan.decontaminate_against, "ngram": plan.decontamination_ngram,
                                "documents_dropped": documents["filtered"].get("contaminated", 0),
                                "documents_dropped_per_task": merge["contaminated_documents_per_task"]}
            if plan.decontaminate_against else None,
            "draw": {"threshold_key": -merge["threshold"]["neg_key"],
                     "rule": "selected: draw key above the threshold, or equal to it and first in (file, line) order"},
            "log_importance_weights": {"unit": f"percentiles from a {HISTOGRAM_BINS}-bin histogram",
                                       **{name: _quantiles(values, edges) for name, values in histograms.items()}},
        }
        plot_weights(histograms, edges, report["output"]["plot"], plan.featurizer["featurizer"])
        write_json(os.path.join(plan.output_dir, "selection_report.json"), report)


def plot_weights(histograms, edges, path, featurizer_name):
    """Histogram of the log importance weights: all candidates against the selected ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, alpha in (("candidates", 0.6), ("selected", 0.8)):
        counts = np.asarray(histograms[name]).reshape(-1, 10).sum(axis=1)
        axis.stairs(counts, edges[::10], fill=True, alpha=alpha, label=f"{name} ({int(counts.sum()):,})")
    axis.set_xlabel("log importance weight (sum of log p_target/p_raw over the document's n-grams)")
    axis.set_ylabel("documents")
    axis.set_title(f"DSIR weights, featurizer {featurizer_name}")
    axis.legend()
    figure.tight_layout()
    with atomic_output(path) as stream:
        figure.savefig(stream, dpi=100, format="png")
    plt.close(figure)
