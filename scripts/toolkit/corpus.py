"""Reading MADLAD-400-style corpora: JSONL or JSONL.gz files, one {"text": ...} per line.

Bad input never disappears silently: each problem either raises `CorpusError` naming
the file and line, or (with `skip_bad_records=True`) is counted by reason in a
`Counter` the caller puts in its report.
"""

import glob
import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class CorpusError(ValueError):
    """A problem in an input file, with the file and line that caused it."""


@dataclass
class ReadStats:
    lines: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)


def expand_paths(patterns) -> list:
    """Files named by paths or glob patterns, in the order given (each glob sorted)."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
        if not matches:
            raise CorpusError(f"{pattern}: no file matches this pattern")
        for match in matches:
            if not Path(match).is_file():
                raise CorpusError(f"{match}: no such file")
            paths.append(match)
    return paths


def _open_lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as stream:
        yield from enumerate(stream, start=1)


def iter_lines(path):
    """Yield (line_number, raw bytes) of one JSONL(.gz) file; `CorpusError` if unreadable or empty."""
    count = 0
    try:
        for count, raw in _open_lines(path):
            yield count, raw
    except (OSError, EOFError) as error:  # truncated or corrupt gzip
        raise CorpusError(f"{path}: cannot be read ({error})") from error
    if count == 0:
        raise CorpusError(f"{path}: the file is empty")


class BadRecord(ValueError):
    """One line that is not a usable record: `reason` is the counter key, `detail` the message."""

    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_line(raw: bytes, text_field="text") -> dict:
    """The record on one raw JSONL line, or `BadRecord` saying why it is not one."""
    if not raw.strip():
        raise BadRecord("blank_line", "blank line")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord("invalid_utf8", f"invalid UTF-8 at byte {error.start}") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadRecord("malformed_json", f"malformed JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", "a JSON object is expected on each line")
    if text_field not in record:
        raise BadRecord("missing_text", f"no {text_field!r} field")
    if not isinstance(record[text_field], str):
        raise BadRecord("text_not_string", f"{text_field!r} is {type(record[text_field]).__name__}, not a string")
    if b"\\u" in raw and _has_lone_surrogate(record):  # JSON escapes can spell what UTF-8 cannot hold
        raise BadRecord("lone_surrogate", "a string holds a lone surrogate (e.g. \"\\ud800\"), which no UTF-8 "
                                          "file can hold")
    return record


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(inner) for key, inner in value.items())
    if isinstance(value, list):
        return any(map(_has_lone_surrogate, value))
    return False


def bad_record_error(path, line_number, bad: BadRecord) -> CorpusError:
    return CorpusError(f"{path}:{line_number}: {bad.detail} (pass --skip_bad_records to count and skip such lines)")


def iter_records(path, text_field="text", skip_bad_records=False, stats=None):
    """Yield (line_number, record) for every good record of one JSONL(.gz) file."""
    stats = stats if stats is not None else ReadStats()
    try:
        for line_number, raw in _open_lines(path):
            stats.lines += 1
            try:
                record = parse_line(raw, text_field)
            except BadRecord as bad:
                if not skip_bad_records:
                    raise bad_record_error(path, line_number, bad) from None
                stats.skipped[bad.reason] += 1
                continue
            stats.records += 1
            yield line_number, record
    except (OSError, EOFError) as error:  # truncated or corrupt gzip
        raise CorpusError(f"{path}: cannot be read ({error})") from error
    if stats.lines == 0:
        raise CorpusError(f"{path}: the file is empty")


def read_texts(paths, text_field="text", skip_bad_records=False):
    """All texts of the given files (paths or globs), with read statistics."""
    stats = ReadStats()
    texts = [
        record[text_field]
        for path in expand_paths(paths)
        for _, record in iter_records(path, text_field, skip_bad_records, stats)
    ]
    return texts, stats
