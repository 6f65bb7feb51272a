"""DSIR importance resampling that works for Japanese (and any text without spaces).

`JapaneseDSIR` subclasses `data_selection.HashedNgramDSIR` and keeps its API
(`fit_importance_estimator`, `compute_importance_weights`, `resample`), changing four things:

- Features. `featurizer="japanese_char_ngrams"` (default) hashes 1..n-grams of units of
  NFKC-normalised, lowercased, whitespace-collapsed text: a unit is a character, except
  that a run of ASCII letters/digits is one unit (a word). The package's word/punctuation
  regex turns a whole Japanese clause into one "word"; characters are the unit that works.
  Hashing is vectorised numpy over code points (polynomial hashes modulo 2**64 and a
  multiply-shift, deterministic across processes and machines, never Python's salted
  `hash()`), on batches of documents at once.
  `featurizer="dsir_default"` keeps the package's own featurizer, for comparison.
- Fitting uses the same features as scoring. The package fits with the module-level
  `get_ngram_counts` whatever `self.featurizer` is; here `_fit_bow` calls this class's
  batch featurizer, so fit and score cannot disagree.
- Smoothing. Bucket probabilities are add-alpha smoothed (default alpha = 1, add-one),
  p = (count + alpha) / (total + alpha * num_buckets), for the raw and the target counts,
  so a bucket the small target sample never hit gives a bounded penalty instead of log(1e-8).
- Length filter in characters (`min_example_chars`), after normalisation, instead of the
  package's `min_example_length` in "words" (which still applies to `dsir_default`).

The passes over the raw pool run on `num_proc` processes in ordered batches, so the
result does not depend on the number of processes; the per-file weights are cached under
`cache_dir` and reused when the inputs and settings are unchanged (resume).
"""

import hashlib
import json
import os
import time
import unicodedata
from collections import Counter, deque
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from data_selection import HashedNgramDSIR
from data_selection.hashed_ngram_dsir import get_ngram_counts
from tqdm import tqdm

from toolkit.corpus import BadRecord, CorpusError, bad_record_error, expand_paths, iter_lines, parse_line

FEATURIZERS = ("japanese_char_ngrams", "dsir_default")
# 2**16 buckets for character n-grams (Japanese alone has thousands of distinct characters);
# the package's 10000 for its own featurizer.
DEFAULT_BUCKETS = {"japanese_char_ngrams": 2**16, "dsir_default": 10000}

# Per-line status codes kept in the cache (perexample_metadata).
CANDIDATE, TOO_SHORT, TOO_FEW_WORDS = 0, 1, 2
FILTER_REASONS = {TOO_SHORT: "too_short_chars", TOO_FEW_WORDS: "too_few_words"}
BAD_REASONS = ("blank_line", "invalid_utf8", "malformed_json", "not_an_object", "missing_text", "text_not_string")
BAD_CODE = {reason: 10 + index for index, reason in enumerate(BAD_REASONS)}
CODE_REASON = {**FILTER_REASONS, **{code: reason for reason, code in BAD_CODE.items()}}

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


class JapaneseDSIR(HashedNgramDSIR):
    """HashedNgramDSIR with character n-gram features, smoothing, a character length filter,
    parallel ordered passes, per-file caching, seeded resampling and full accounting."""

    def __init__(
        self,
        raw_datasets,
        target_datasets,
        cache_dir,
        featurizer="japanese_char_ngrams",
        ngrams=3,
        num_buckets=None,
        min_example_chars=100,
        min_example_length=100,
        smoothing_alpha=1.0,
        latin_words=True,
        num_proc=None,
        seed=0,
        text_field="text",
        skip_bad_records=False,
        batch_size=512,
        show_progress=True,
    ):
        if smoothing_alpha <= 0:
            raise ValueError(f"smoothing_alpha must be > 0 (got {smoothing_alpha}): it keeps every log ratio finite")
        if featurizer not in FEATURIZERS:
            raise ValueError(f"featurizer {featurizer!r} is not one of {FEATURIZERS}")
        super().__init__(
            raw_datasets=list(raw_datasets),
            target_datasets=list(target_datasets),
            cache_dir=cache_dir,
            num_proc=num_proc,
            ngrams=ngrams if featurizer == "japanese_char_ngrams" else 2,
            num_buckets=num_buckets or DEFAULT_BUCKETS[featurizer],
            min_example_length=min_example_length,
        )
        self.featurizer_name = featurizer
        self.min_example_chars = min_example_chars
        self.smoothing_alpha = smoothing_alpha
        self.latin_words = latin_words
        self.seed = seed
        self.text_field = text_field
        self.skip_bad_records = skip_bad_records
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.raw_counts = self.target_counts = None
        self.timings = {}
        self.resumed = {}
        self.target_stats = {}

    # ----- features -------------------------------------------------------------------
    def settings(self) -> dict:
        """Everything that changes the features or the weights (part of the cache key)."""
        return selection_settings(self.featurizer_name, self.ngrams, self.num_buckets, self.min_example_chars,
                                  self.min_example_length, self.smoothing_alpha, self.text_field, self.latin_words)

    def prepare(self, texts):
        """(features, lengths, words) of a batch of raw texts.

        features: the normalised texts (japanese_char_ngrams) or one count vector per text
        (dsir_default); lengths: characters after normalisation (the length filter's unit);
        words: the package's word count per text (dsir_default only, else None).
        """
        normalized = [normalize_text(text) for text in texts]
        lengths = np.fromiter(map(len, normalized), dtype=np.int64, count=len(normalized))
        if self.featurizer_name == "japanese_char_ngrams":
            return normalized, lengths, None
        counts = [get_ngram_counts(text, n=self.ngrams, num_buckets=self.num_buckets, tokenizer=self.tokenizer)
                  for text in texts]
        words = np.asarray([HashedNgramDSIR.get_perexample_metadata(self, None, c) for c in counts])
        return counts, lengths, words

    def count_features(self, features, keep=None) -> np.ndarray:
        """Bucket counts summed over the kept texts of a batch (fitting)."""
        kept = [f for index, f in enumerate(features) if keep is None or keep[index]]
        if self.featurizer_name == "japanese_char_ngrams":
            return char_ngram_counts(kept, self.ngrams, self.num_buckets, self.latin_words)
        return np.sum(kept, axis=0) if kept else np.zeros(self.num_buckets, dtype=np.int64)

    def score_features(self, features, keep=None) -> np.ndarray:
        """Log importance weights (log_diff . counts) of the kept texts of a batch (scoring)."""
        kept = [f for index, f in enumerate(features) if keep is None or keep[index]]
        if self.featurizer_name == "japanese_char_ngrams":
            return char_ngram_scores(kept, self.log_diff, self.ngrams, self.latin_words)
        return np.asarray([self.importance_estimator(c) for c in kept], dtype=np.float64)

    def importance_estimator(self, features) -> float:
        """log_diff . features; in float64 (numpy's float . int64 dot skips BLAS and is ~100x slower)."""
        return float(self.log_diff @ np.asarray(features, dtype=np.float64))

    def featurizer(self, text: str) -> np.ndarray:
        """The package's per-document API: a count vector over the hash buckets."""
        features, _, _ = self.prepare([text])
        return self.count_features(features)

    def score_batch(self, texts) -> np.ndarray:
        features, _, _ = self.prepare(texts)
        return self.score_features(features)

    def get_perexample_metadata(self, ex, features):
        """The length the filter looks at: words for dsir_default (as the package), else characters."""
        if self.featurizer_name == "dsir_default":
            return super().get_perexample_metadata(ex, features)
        return len(normalize_text(ex[self.text_field]))

    # ----- passes over files ----------------------------------------------------------
    def _scan(self, paths, mode, description, apply_filter=True):
        """One ordered pass over `paths`; mode "count" returns bucket counts, "score" per-file arrays."""
        task = {"mode": mode, "apply_filter": apply_filter}
        results = _ordered_map(
            self, task, self._batches(paths), self.num_proc, self.show_progress, description
        )
        return results

    def _batches(self, paths):
        for file_index, path in enumerate(paths):
            batch, first = [], None
            for line_number, raw in iter_lines(path):
                if first is None:
                    first = line_number
                batch.append(raw)
                if len(batch) >= self.batch_size:
                    yield file_index, path, first, batch
                    batch, first = [], None
            if batch:
                yield file_index, path, first, batch

    def _fit_bow(self, paths, num_tokens_to_fit=None, apply_filter=True, description="fit"):
        """Bucket counts of `paths` with THIS class's featurizer (the package uses get_ngram_counts)."""
        counts = np.zeros(self.num_buckets, dtype=np.int64)
        stats = Counter()
        for result in self._scan(paths, "count", description, apply_filter):
            counts += result["counts"]
            stats.update(result["stats"])
            if num_tokens_to_fit is not None and counts.sum() >= num_tokens_to_fit:
                stats["stopped_early_at_ngrams"] = int(counts.sum())
                break
        return counts, dict(stats)

    def fit_importance_estimator(self, num_tokens_to_fit="auto") -> None:
        """Fit raw and target bucket distributions (add-alpha smoothed) and their log ratio."""
        if num_tokens_to_fit == "auto":
            num_tokens_to_fit = 100000 * self.num_buckets
        elif num_tokens_to_fit == "all":
            num_tokens_to_fit = None
        estimator_path = self.cache_dir / "estimator.npz"
        started = time.time()
        if estimator_path.exists():
            saved = np.load(estimator_path)
            self.raw_counts, self.target_counts = saved["raw_counts"], saved["target_counts"]
            self.target_stats = json.loads(str(saved["target_stats"]))
            self.resumed["estimator"] = True
        else:
            self.raw_counts, _ = self._fit_bow(self.raw_datasets, num_tokens_to_fit, description="fit raw")
            self.target_counts, self.target_stats = self._fit_bow(
                self.target_datasets, None, apply_filter=False, description="fit target"
            )
            if self.target_counts.sum() == 0:
                raise CorpusError(f"the target datasets {self.target_datasets} contain no text to fit on")
            _save_atomic(estimator_path, raw_counts=self.raw_counts, target_counts=self.target_counts,
                         target_stats=json.dumps(self.target_stats))
            self.resumed["estimator"] = False
        self.raw_probs = smoothed_probs(self.raw_counts, self.smoothing_alpha)
        self.target_probs = smoothed_probs(self.target_counts, self.smoothing_alpha)
        self.log_diff = np.log(self.target_probs) - np.log(self.raw_probs)
        self.timings["fit_s"] = round(time.time() - started, 3)

    def compute_importance_weights(self) -> None:
        """Score every raw line; cache per file: log weight, status code and characters."""
        started = time.time()
        self.log_importance_weights_dir.mkdir(parents=True, exist_ok=True)
        self.perexample_metadata_dir.mkdir(parents=True, exist_ok=True)
        todo = [(index, path) for index, path in enumerate(self.raw_datasets) if not self._weights_path(index).exists()]
        self.resumed["weights_files_reused"] = len(self.raw_datasets) - len(todo)
        pending = {}
        for result in self._scan([path for _, path in todo], "score", "score raw"):
            file_index = todo[result["file_index"]][0]
            pending.setdefault(file_index, []).append(result)
            if result["last_in_file"]:
                parts = pending.pop(file_index)
                np.save(_temporary(self._metadata_path(file_index)),
                        np.stack([np.concatenate([p["status"] for p in parts]),
                                  np.concatenate([p["chars"] for p in parts])]))
                np.save(_temporary(self._weights_path(file_index)), np.concatenate([p["scores"] for p in parts]))
                os.replace(_temporary(self._metadata_path(file_index)), self._metadata_path(file_index))
                os.replace(_temporary(self._weights_path(file_index)), self._weights_path(file_index))
        self.timings["score_s"] = round(time.time() - started, 3)

    def _weights_path(self, index):
        return self.log_importance_weights_dir / f"{index}.npy"

    def _metadata_path(self, index):
        return self.perexample_metadata_dir / f"{index}.npy"

    def load_weights(self):
        """(log_weights, status, chars) over all raw lines, in file and line order."""
        weights = [np.load(self._weights_path(i)) for i in range(len(self.raw_datasets))]
        metadata = [np.load(self._metadata_path(i)) for i in range(len(self.raw_datasets))]
        return (np.concatenate(weights), np.concatenate([m[0] for m in metadata]),
                np.concatenate([m[1] for m in metadata]))

    def choose(self, num_to_sample, top_k=False) -> np.ndarray:
        """Boolean mask over all raw lines: Gumbel top-k sampling without replacement (as the
        package does), among the candidates that passed the filters, seeded by `self.seed`."""
        log_weights, status, _ = self.load_weights()
        candidates = np.flatnonzero(status == CANDIDATE)
        if num_to_sample > len(candidates):
            raise ValueError(
                f"--num_to_sample {num_to_sample} is more than the {len(candidates)} documents that passed the "
                f"filters; lower it, add raw data, or lower --min_example_chars"
            )
        keys = log_weights[candidates].astype(np.float64)
        if not top_k:
            keys = keys + np.random.default_rng(self.seed).gumbel(size=len(candidates))
        chosen = candidates[np.argsort(-keys, kind="stable")[:num_to_sample]]
        mask = np.zeros(len(status), dtype=bool)
        mask[chosen] = True
        return mask

    def resample(self, out_dir, num_to_sample, cache_dir=None, top_k=False) -> dict:
        """Write the chosen documents, original lines byte for byte, to out_dir/selected.jsonl."""
        started = time.time()
        mask = self.choose(num_to_sample, top_k)
        out_path = Path(out_dir) / "selected.jsonl"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = out_path.with_name(f".{out_path.name}.tmp")
        position, written = 0, 0
        with open(temporary, "wb") as stream:
            for path in tqdm(self.raw_datasets, desc="write selected", unit="file", disable=not self.show_progress):
                for _, raw in iter_lines(path):
                    if mask[position]:
                        stream.write(raw.rstrip(b"\r\n") + b"\n")
                        written += 1
                    position += 1
        if position != len(mask):
            raise CorpusError(f"the raw files changed since their weights were cached under {self.cache_dir}; "
                              f"delete that folder and run again")
        os.replace(temporary, out_path)
        self.timings["resample_s"] = round(time.time() - started, 3)
        return {"path": str(out_path), "documents": written, "mask": mask}


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


def _temporary(path: Path) -> Path:
    return path.with_name(f".tmp.{path.name}")


def _save_atomic(path: Path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp.{path.stem}.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


# ----- worker side: parse + featurize + score one batch of raw lines --------------------
_WORKER = {}


def _init_worker(dsir, task):
    _WORKER["dsir"], _WORKER["task"] = dsir, task


def _process_batch(item):
    file_index, path, first_line, raw_lines = item
    dsir, task = _WORKER["dsir"], _WORKER["task"]
    status = np.full(len(raw_lines), CANDIDATE, dtype=np.int64)
    texts, positions = [], []
    for offset, raw in enumerate(raw_lines):
        try:
            record = parse_line(raw, dsir.text_field)
        except BadRecord as bad:
            if not dsir.skip_bad_records:
                raise bad_record_error(path, first_line + offset, bad) from None
            status[offset] = BAD_CODE[bad.reason]
            continue
        texts.append(record[dsir.text_field])
        positions.append(offset)
    positions = np.asarray(positions, dtype=np.int64)
    features, lengths, words = dsir.prepare(texts)
    chars = np.zeros(len(raw_lines), dtype=np.int64)
    chars[positions] = lengths
    keep = np.ones(len(texts), dtype=bool)
    if task["apply_filter"]:
        too_short = lengths < dsir.min_example_chars
        status[positions[too_short]] = TOO_SHORT
        keep &= ~too_short
        if words is not None:
            too_few = (words < dsir.min_example_length) & keep
            status[positions[too_few]] = TOO_FEW_WORDS
            keep &= ~too_few
    result = {"file_index": file_index, "status": status, "chars": chars}
    if task["mode"] == "count":
        result["counts"] = dsir.count_features(features, keep)
        result["stats"] = {"documents": len(raw_lines), "used": int(keep.sum()), "characters": int(lengths.sum()),
                           **Counter(CODE_REASON[c] for c in status if c != CANDIDATE)}
    else:
        scores = np.full(len(raw_lines), np.nan)
        scores[positions[keep]] = dsir.score_features(features, keep)
        result["scores"] = scores
    return result


def _ordered_map(dsir, task, batches, num_proc, show_progress, description):
    """Results of `_process_batch` in input order, at most 2 * num_proc batches in flight."""
    progress = tqdm(desc=description, unit="doc", disable=not show_progress, mininterval=1.0)
    batches = _mark_last(batches)
    try:
        if num_proc <= 1:
            _init_worker(dsir, task)
            for item, last in batches:
                result = _process_batch(item)
                result["last_in_file"] = last
                progress.update(len(item[3]))
                yield result
            return
        with get_context("fork").Pool(num_proc, initializer=_init_worker, initargs=(dsir, task)) as pool:
            in_flight = deque()
            for item, last in batches:
                in_flight.append((pool.apply_async(_process_batch, (item,)), last, len(item[3])))
                if len(in_flight) >= 2 * num_proc:
                    yield _collect(in_flight.popleft(), progress)
            while in_flight:
                yield _collect(in_flight.popleft(), progress)
    finally:
        progress.close()


def _collect(entry, progress):
    future, last, size = entry
    result = future.get()
    result["last_in_file"] = last
    progress.update(size)
    return result


def _mark_last(batches):
    """(batch, is_last_batch_of_its_file) pairs."""
    previous = None
    for item in batches:
        if previous is not None:
            yield previous, previous[0] != item[0]
        previous = item
    if previous is not None:
        yield previous, True


# ----- inputs: local files, globs, and Hub datasets -----------------------------------
HF_PREFIX = "hf://datasets/"


def snapshot_download(**kwargs):  # indirection so that tests can stand in for the Hub
    from huggingface_hub import snapshot_download as download

    return download(**kwargs)


def resolve_inputs(patterns, hub_dataset=None, hub_files=(), revision=None, cache_dir=None):
    """Local files for the given paths/globs, `hf://datasets/<org>/<name>/<pattern>` entries, and
    a `hub_dataset` id with `hub_files` patterns. From the Hub only the files matching the
    patterns are downloaded (snapshot_download with allow_patterns), as the original recipe did."""
    hub = {}
    local = []
    for pattern in patterns:
        pattern = str(pattern)
        if pattern.startswith(HF_PREFIX):
            parts = pattern[len(HF_PREFIX):].split("/", 2)
            if len(parts) < 3:
                raise ValueError(f"{pattern}: expected hf://datasets/<org>/<name>/<file pattern>")
            hub.setdefault(f"{parts[0]}/{parts[1]}", []).append(parts[2])
        else:
            local.append(pattern)
    if hub_dataset:
        if not hub_files:
            raise ValueError("--hub_dataset needs --hub_files (e.g. 'data/ja/ja_clean_0000.jsonl.gz')")
        hub.setdefault(hub_dataset, []).extend(hub_files)
    paths = expand_paths(local) if local else []
    for repo_id, file_patterns in hub.items():
        folder = snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=list(file_patterns),
                                   revision=revision, cache_dir=cache_dir)
        for file_pattern in file_patterns:
            try:
                paths.extend(expand_paths([str(Path(folder) / file_pattern)]))
            except CorpusError as error:
                raise CorpusError(f"hf://datasets/{repo_id}/{file_pattern}: nothing downloaded matches ({error})") from None
    return paths


def file_fingerprint(paths) -> list:
    return [{"path": str(path), "bytes": os.path.getsize(path), "mtime": int(os.path.getmtime(path))} for path in paths]


def cache_key(raw_paths, target_paths, settings) -> str:
    payload = json.dumps({"raw": file_fingerprint(raw_paths), "target": file_fingerprint(target_paths),
                          "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
