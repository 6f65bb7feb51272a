"""The data engine of the selection and mix stages: datatrove executors, work units and readers.

A data stage is a list of `Stage`s (a name, datatrove pipeline steps, a task count) that
`run_stages` hands to datatrove's Local, Slurm or Ray executor. Every stage keeps its own
logging folder with datatrove's per-task completion markers, so running the same command
after a crash or a SIGKILL redoes only the tasks that did not finish; every file a task
writes goes through a temporary name, fsync and a rename (`atomic_output`), so a killed
task leaves nothing a rerun could mistake for output.

Work is split into `WorkUnit`s: one per input file, or, when there are fewer files than
tasks, several line-interleaved parts per file (so that the demo's single file still uses
both cores). Results never depend on the split: every per-document decision is keyed by
(file, line), never by task.

Readers stream through fsspec (`hf://datasets/...` is read in place, no copy first) and
accept .jsonl, .jsonl.gz, .jsonl.zst and .parquet. datatrove's stock readers log and skip
bad lines; ours keep the toolkit's accounting (`toolkit.corpus.parse_line`): a bad line
is a `CorpusError` naming file and line, or under `skip_bad_records` a counted reason.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
from tqdm import tqdm

from toolkit.corpus import CorpusError, expand_paths

EXECUTORS = ("local", "slurm", "ray")
SCRIPTS_DIR = str(Path(__file__).resolve().parents[1])  # what a Slurm job or a Ray worker must import from


@dataclass
class ExecutorArguments:
    executor: str = field(default="local", metadata={
        "help": "Where the tasks run: local (this machine), slurm (sbatch job arrays) or ray (a Ray cluster).",
        "choices": list(EXECUTORS)})
    tasks: int = field(default=None, metadata={
        "help": "Shards of work of each map stage (default: --workers for local, the number of input files "
                "for slurm and ray). The output does not depend on it."})
    workers: int = field(default=None, metadata={
        "help": "Tasks run at once (local: processes; default all cores available. slurm/ray: the cap on "
                "concurrent tasks, default no cap)."})
    slurm_partition: str = field(default=None, metadata={"help": "Slurm partition (required with --executor slurm)."})
    slurm_time: str = field(default="24:00:00", metadata={"help": "Slurm time limit of each task."})
    slurm_cpus_per_task: int = field(default=1, metadata={"help": "CPUs of each Slurm task."})
    slurm_mem_per_cpu_gb: int = field(default=2, metadata={"help": "Memory per CPU of each Slurm task, in GB."})
    slurm_qos: str = field(default="normal", metadata={"help": "Slurm QOS."})
    slurm_env_command: str = field(default=None, metadata={
        "help": "Shell command that activates the Python environment in a Slurm job (default: this venv)."})
    ray_address: str = field(default=None, metadata={
        "help": "Address of a running Ray cluster (e.g. 'auto' or 'ray://head:10001'); default: start a local one."})
    ray_cpus_per_task: int = field(default=1, metadata={"help": "CPUs reserved for each Ray task."})
    ray_mem_per_cpu_gb: float = field(default=2, metadata={"help": "Memory reserved per CPU of each Ray task, in GB."})
    show_progress: bool = field(default=True, metadata={"help": "A progress bar over the stages (local and Ray)."})
    show_task_logs: bool = field(default=False, metadata={"help": "Show datatrove's per-task INFO logs on the console."})

    def validate(self):
        if self.executor not in EXECUTORS:
            raise SystemExit(f"--executor must be one of {EXECUTORS}, got {self.executor!r}")
        for name in ("tasks", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SystemExit(f"--{name} must be at least 1, got {value}")
        if self.executor == "slurm" and not self.slurm_partition:
            raise SystemExit("--executor slurm needs --slurm_partition")

    def resolved(self, num_files: int) -> "ExecutorArguments":
        """A copy with tasks and workers filled in."""
        cores = len(os.sched_getaffinity(0))
        workers = self.workers or (cores if self.executor == "local" else None)
        tasks = self.tasks or (workers if self.executor == "local" else max(1, num_files))
        return ExecutorArguments(**{**self.__dict__, "tasks": tasks, "workers": workers})


@dataclass
class Stage:
    """One datatrove job: `pipeline` runs once per task, `tasks` times (1 for a reduce)."""

    name: str
    pipeline: list
    tasks: int
    logging_dir: str  # datatrove's logs, stats and completion markers of this stage


# ----- quiet task logs ---------------------------------------------------------------------
def _console_format(record):
    # A callable format: loguru then adds no traceback. The log files keep every detail.
    return "datatrove " + record["level"].name.lower() + ": {message}\n"


_LOCAL_RAY_WARNING = "Logging directory points to a local filesystem"


def _install_quiet_logs(verbose, local_files_are_shared=True):
    """datatrove prints INFO lines, per-stage stats and each failing task's full traceback to
    stderr. Unless --show_task_logs: the console shows warnings and one-line errors (ours already name
    the file and line); each task's log FILE under the stage's logs/ keeps everything."""
    if verbose:
        return
    import datatrove.executor.base as base
    import datatrove.executor.ray as ray_module
    import datatrove.utils.logging as datatrove_logging
    from loguru import logger

    def console_only():
        logger.remove()
        # A Ray instance started here shares this machine's disk: its "local filesystem" warning is moot.
        logger.add(sys.stderr, level="WARNING", colorize=False, format=_console_format,
                   filter=lambda record: not (local_files_are_shared and _LOCAL_RAY_WARNING in record["message"]))

    def add_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
        console_only()
        logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
        logger.add(logfile, level="DEBUG", colorize=False)
        logger.info(f"Launching pipeline for {rank=}")
        return logfile

    datatrove_logging.setup_default_logger = console_only  # what close_task_logger restores
    base.add_task_logger = ray_module.add_task_logger = add_task_logger
    console_only()


# ----- running stages ------------------------------------------------------------------------
def run_stages(stages, args: ExecutorArguments) -> dict | None:
    """Run `stages` in order with the chosen executor, each logging under its `logging_dir`.

    Local and Ray run here, stage after stage, raise if a stage has unfinished tasks, and
    return the seconds each stage took. Slurm submits job arrays chained with `depends=` and
    returns at once (None: the outputs appear when the jobs finish). Completed tasks (markers
    under each stage's `completions/`) are skipped, which is what makes a rerun resume.
    """
    _install_quiet_logs(args.show_task_logs, local_files_are_shared=not args.ray_address)
    die_with_this_process()
    if args.executor == "slurm":
        _submit_slurm(stages, args)
        return None
    if args.executor == "ray":
        _start_ray(args)
    timings = {}
    for stage in tqdm(stages, desc="stages", unit="stage", disable=not args.show_progress):
        started = time.perf_counter()
        executor = _executor(stage, args, stage.logging_dir)
        executor.run()
        incomplete = executor.get_incomplete_ranks(skip_completed=True)
        if incomplete:  # Ray logs a failed task and goes on: say why, from the task's log
            reason = task_error(stage.logging_dir, incomplete)
            raise CorpusError(f"stage {stage.name!r}: tasks {incomplete[:10]} did not finish"
                              f"{': ' + reason if reason else ''} (logs: {os.path.join(stage.logging_dir, 'logs')})")
        timings[stage.name] = round(time.perf_counter() - started, 3)
    return timings


_PARENT = {}


def _die_with_parent():
    # Linux: the kernel sends SIGKILL to this child when the process that forked it dies, however
    # it dies (SIGKILL included), so no pool worker or Manager outlives the command.
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != _PARENT.get("pid"):  # the parent died before the line above
        os._exit(1)


def die_with_this_process():
    """Every process forked from here on (datatrove's pool workers, its multiprocessing Manager) is
    killed when this one dies (`os.register_at_fork`, a public hook: no library is patched)."""
    if not sys.platform.startswith("linux") or _PARENT.get("pid") == os.getpid():
        return
    if "pid" not in _PARENT:
        os.register_at_fork(before=lambda: _PARENT.__setitem__("pid", os.getpid()),
                            after_in_child=_die_with_parent)
    _PARENT["pid"] = os.getpid()


def task_error(logging_dir, ranks):
    """The message of the first error logged by one of `ranks` (datatrove logs a failed task's
    exception in logs/task_NNNNN.log), or None."""
    for rank in ranks:
        try:
            with open(os.path.join(logging_dir, "logs", f"task_{rank:05d}.log"), encoding="utf-8") as stream:
                for line in stream:
                    match = re.search(r"\| ERROR\s*\| .*? - (.*)$", line)
                    if match:
                        return match.group(1).strip()
        except OSError:
            continue
    return None


def _executor(stage, args, logging_dir):
    if args.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        workers = max(1, min(args.workers or 1, stage.tasks))
        # fork: workers start in milliseconds (the demo's stages take seconds); every task
        # opens its own files, nothing is shared after the fork.
        return LocalPipelineExecutor(pipeline=stage.pipeline, tasks=stage.tasks, workers=workers,
                                     logging_dir=logging_dir, start_method="fork")
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(pipeline=stage.pipeline, tasks=stage.tasks,
                               workers=min(args.workers, stage.tasks) if args.workers else -1,
                               logging_dir=logging_dir, cpus_per_task=args.ray_cpus_per_task,
                               mem_per_cpu_gb=args.ray_mem_per_cpu_gb)


def _start_ray(args):
    import ray

    if ray.is_initialized():
        return
    # Workers import our pipeline steps from scripts/toolkit: put it on their path.
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [SCRIPTS_DIR, os.environ.get("PYTHONPATH")]))}}
    if args.ray_address:
        ray.init(address=args.ray_address, runtime_env=runtime_env, log_to_driver=args.show_task_logs)
    else:
        ray.init(num_cpus=args.workers or len(os.sched_getaffinity(0)), runtime_env=runtime_env,
                 include_dashboard=False, log_to_driver=args.show_task_logs)


def _submit_slurm(stages, args):
    from datatrove.executor import SlurmPipelineExecutor

    env_command = args.slurm_env_command or (
        f"source {Path(sys.executable).parent / 'activate'}" if (Path(sys.executable).parent / "activate").exists() else "")
    env_command = f"{env_command}\nexport PYTHONPATH={SCRIPTS_DIR}:$PYTHONPATH".strip()
    previous = None
    for stage in stages:
        previous = SlurmPipelineExecutor(
            pipeline=stage.pipeline, tasks=stage.tasks, time=args.slurm_time, partition=args.slurm_partition,
            cpus_per_task=args.slurm_cpus_per_task, mem_per_cpu_gb=args.slurm_mem_per_cpu_gb, qos=args.slurm_qos,
            workers=args.workers or -1, job_name=stage.name, env_command=env_command,
            logging_dir=stage.logging_dir, depends=previous)
    previous.run()  # launches the whole chain (each job waits for the one before it)


# ----- work units ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkUnit:
    """Lines `part`, `part + parts`, ... of one input file (parts = 1: the whole file)."""

    index: int
    file_index: int
    path: str
    part: int = 0
    parts: int = 1


def plan_units(paths, tasks) -> list:
    """One unit per file; several line-interleaved parts per file when there are fewer files than tasks."""
    parts = max(1, math.ceil(tasks / len(paths))) if paths else 1
    units = []
    for file_index, path in enumerate(paths):
        for part in range(parts):
            units.append(WorkUnit(len(units), file_index, str(path), part, parts))
    return units


def units_of_rank(units, rank, world_size) -> list:
    return units[rank::world_size]


# ----- inputs --------------------------------------------------------------------------------
HF_PREFIX = "hf://datasets/"
FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".parquet")


def snapshot_download(**kwargs):  # indirection so that tests can stand in for the Hub
    from huggingface_hub import snapshot_download as download

    return download(**kwargs)


def resolve_inputs(patterns, download=False, revision=None, cache_dir=None, formats=FORMATS) -> list:
    """Files named by paths, globs or `hf://datasets/<org>/<name>/<pattern>`, in the order given
    (each glob sorted); `formats=None` accepts any file. Hub files are streamed where they are, unless `download`: then only the
    matching files are copied first (`snapshot_download(allow_patterns=...)`)."""
    paths = []
    for pattern in map(str, patterns):
        if pattern.startswith(HF_PREFIX) and download:
            parts = pattern[len(HF_PREFIX):].split("/", 2)
            if len(parts) < 3:
                raise CorpusError(f"{pattern}: expected hf://datasets/<org>/<name>/<file pattern>")
            folder = snapshot_download(repo_id=f"{parts[0]}/{parts[1]}", repo_type="dataset",
                                       allow_patterns=[parts[2]], revision=revision, cache_dir=cache_dir)
            try:
                paths.extend(resolve_inputs([str(Path(folder) / parts[2])], formats=formats))
            except CorpusError as error:
                raise CorpusError(f"{pattern}: nothing downloaded matches ({error})") from None
            continue
        if pattern.startswith(HF_PREFIX) and revision and "@" not in pattern.split("/")[3]:
            org, name, rest = pattern[len(HF_PREFIX):].split("/", 2)
            pattern = f"{HF_PREFIX}{org}/{name}@{revision}/{rest}"
        if "://" not in pattern:  # a local path keeps the form it was given in (relative stays relative)
            matches = expand_paths([pattern])
            for match in matches:
                if formats and not match.endswith(formats):
                    raise CorpusError(f"{match}: unknown format; expected one of {', '.join(FORMATS)}")
            paths.extend(matches)
            continue
        filesystem, plain = fsspec.core.url_to_fs(pattern)
        if glob_magic(pattern):
            # like a shell glob, a pattern never matches hidden names (our temporaries are .tmp.*)
            matches = sorted(m for m in filesystem.glob(plain) if not is_temporary(m))
            if not matches:
                raise CorpusError(f"{pattern}: no file matches this pattern")
            protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
            matches = [m if not protocol or m.startswith(protocol) else protocol + m for m in matches]
        else:
            if not filesystem.isfile(plain):
                raise CorpusError(f"{pattern}: no such file")
            matches = [pattern]
        for match in matches:
            if formats and not match.endswith(formats):
                raise CorpusError(f"{match}: unknown format; expected one of {', '.join(FORMATS)}")
        paths.extend(matches)
    return paths


def is_temporary(path) -> bool:
    """A hidden name: `atomic_output`'s `.tmp.PID.NAME` and every other dot-file. Never an input,
    never listed as output."""
    return os.path.basename(str(path).rstrip("/")).startswith(".")


def final_files(folder, pattern=r"\d{5}\.jsonl\.gz") -> list:
    """The final output files of one of our folders (names matching `pattern`, sorted): what a
    reader of our own outputs lists, so that a killed writer's temporary is never read."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if re.fullmatch(pattern, name))


def remove_temporaries(folder) -> int:
    """Remove the temporaries (`.tmp.*`) a killed writer left in `folder` and below; how many."""
    removed = 0
    for root, folders, names in os.walk(folder):
        for name in names:
            if name.startswith(".tmp.") or name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))
                    removed += 1
    return removed


def input_identity(path) -> str:
    """What makes two spellings of an input the same file: its real path (symlinks, "..", "./"
    resolved), or for a URL the URL with its size."""
    text = str(path)
    if "://" not in text or text.startswith("file://"):
        return os.path.realpath(text.removeprefix("file://"))
    filesystem, plain = fsspec.core.url_to_fs(text)
    return f"{filesystem.protocol if isinstance(filesystem.protocol, str) else filesystem.protocol[0]}://{plain}" \
           f"#{filesystem.info(plain).get('size')}"


def dedupe_inputs(paths) -> tuple:
    """(paths without repeats, the repeats): a file named twice, however spelled (overlapping globs,
    "./x" and "/abs/x", a symlink), is read once. The caller warns and reports the count."""
    seen, kept, repeats = set(), [], []
    for path in paths:
        identity = input_identity(path)
        if identity in seen:
            repeats.append(path)
        else:
            seen.add(identity)
            kept.append(path)
    return kept, repeats


def check_output_dir(output_dir, inputs, flag="--output_dir"):
    """One-line refusals before any work: an output folder that is a file, that cannot be created or
    written, or that holds (or is held by) an input: a rerun would delete or read its own output."""
    if "://" in str(output_dir):
        return
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SystemExit(f"{flag} {output_dir} is a file, not a folder")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".tmp.{os.getpid()}.write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise SystemExit(f"{flag} {output_dir} cannot be written ({error.strerror or error}); choose another folder "
                         f"or fix its permissions") from None
    folder = os.path.realpath(output_dir)
    for path in inputs:
        if "://" in str(path) and not str(path).startswith("file://"):
            continue
        real = input_identity(path)
        if real == folder or real.startswith(folder + os.sep):
            raise SystemExit(f"{path} is inside {flag} {output_dir}: the output of a run would become the input of "
                             f"the next; write the output elsewhere")


def warn_duplicates(repeats, what) -> int:
    """A one-line warning for inputs given more than once (read once); the count for the report."""
    if repeats:
        print(f"warning: {len(repeats)} {what} given more than once (read once): {repeats[0]}"
              f"{' and others' if len(repeats) > 1 else ''}", file=sys.stderr)
    return len(repeats)


def canonical_name(path) -> str:
    """A file's identity for per-line random draws, independent of how its path is spelled or
    where its dataset is mounted: its file name and its size in bytes."""
    filesystem, plain = fsspec.core.url_to_fs(str(path))
    return f"{os.path.basename(plain)}:{int(filesystem.info(plain).get('size') or 0)}"


def glob_magic(pattern) -> bool:
    return any(character in pattern for character in "*?[")


def file_fingerprint(paths) -> list:
    """Path, size and modification time (or etag) of each input: part of every cache key."""
    rows = []
    for path in paths:
        filesystem, plain = fsspec.core.url_to_fs(path)
        info = filesystem.info(plain)
        stamp = info.get("mtime") or info.get("last_modified") or info.get("LastModified") or info.get("etag") \
            or (info.get("last_commit") or {}).get("oid") or info.get("blob_id")
        if hasattr(stamp, "timestamp"):
            stamp = stamp.timestamp()
        rows.append({"path": str(path), "bytes": int(info.get("size") or 0),
                     "mtime": int(stamp) if isinstance(stamp, (int, float)) else str(stamp)})
    return rows


def stable_key(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def iter_raw_lines(path, part=0, parts=1, text_field="text"):
    """(line_number, raw bytes) of the lines of one input that belong to `part` of `parts`.

    JSONL (.jsonl, .gz, .zst) gives each line as it is in the file (CR LF kept); a parquet row
    gives the JSON object of its columns (line_number = row, from 1; `parquet_record`). A
    compressed stream that ends early is a `CorpusError` naming the file and the byte offset,
    never a short read. `CorpusError` if the file cannot be read or holds no line at all.
    """
    count = 0
    try:
        if str(path).endswith(".parquet"):
            rows = _parquet_rows(path, text_field)
        else:
            rows = _jsonl_rows(path)
        for count, raw in rows:
            if (count - 1) % parts == part:
                yield count, raw
    except (OSError, EOFError, ValueError) as error:  # truncated gzip/zstd, corrupt parquet
        if isinstance(error, CorpusError):
            raise
        raise CorpusError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    if count == 0:
        raise CorpusError(f"{path}: the file is empty")


class _CountingReader:
    """A binary stream that counts the bytes read from it (the offset a truncation is reported at)."""

    def __init__(self, stream):
        self.stream, self.offset = stream, 0

    def read(self, size=-1):
        data = self.stream.read(size)
        self.offset += len(data)
        return data

    def readable(self):
        return True


def _truncated(path, compressed_offset, line_number, what):
    return CorpusError(f"{path}: the {what} stream ends early at byte {compressed_offset:,} of the file, inside or "
                       f"after line {line_number + 1} (lines 1-{line_number} were complete): the file is truncated; "
                       f"download it again")


def _split_lines(chunks):
    """Lines (with their end of line) of a stream of byte chunks; the last one may lack its newline."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        if b"\n" not in chunk:
            continue
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


def _decompressed_chunks(counter, state, new_stream, padding=b""):
    """Decompressed chunks of every frame (zstd) or member (gzip) in turn, from `new_stream()`
    decompressors (zstandard's `decompressobj` and zlib's share `decompress`, `eof` and
    `unused_data`); marks the stream truncated when the data ends inside one (zstandard's
    stream_reader and gzip's line iteration return a short read there, silently). Bytes left
    after a member that are all `padding` (gzip's trailing zeros) are no member."""
    stream, fed = new_stream(), False
    while True:
        data = counter.read(1 << 20)
        if not data:
            break
        while data:
            output = stream.decompress(data)
            fed = True
            if output:
                yield output
            if stream.eof:
                data, stream, fed = stream.unused_data, new_stream(), False
                if padding and not data.strip(padding):
                    data = b""
            else:
                data = b""
    if fed and not stream.eof:
        state["truncated"] = True


def _zstd_chunks(counter, state):
    import zstandard

    return _decompressed_chunks(counter, state, zstandard.ZstdDecompressor().decompressobj)


def _gzip_chunks(counter, state):
    import zlib

    # a gzip file may hold several members; trailing zero padding is no member
    return _decompressed_chunks(counter, state, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), padding=b"\0")


def _jsonl_rows(path):
    name = str(path)
    kind = "zstd" if name.endswith((".zst", ".zstd")) else "gzip" if name.endswith(".gz") else None
    with fsspec.open(path, "rb") as raw:
        if kind is None:
            yield from enumerate(raw, start=1)
            return
        counter, state = _CountingReader(raw), {"truncated": False}
        chunks = (_zstd_chunks if kind == "zstd" else _gzip_chunks)(counter, state)
        number, held = 0, None
        # one line is held back: a stream that turns out truncated never yields its partial last line
        for line in _split_lines(chunks):
            if held is not None:
                number += 1
                yield number, held
            held = line
        if state["truncated"]:
            raise _truncated(path, counter.offset, number, kind)
        if held is not None:
            yield number + 1, held


STRING_TYPES = ("string", "large_string", "string_view")
BINARY_TYPES = ("binary", "large_binary", "binary_view")


def json_native(value):
    """A parquet value as JSON: nested lists and structs kept, timestamps/dates/times as ISO-8601,
    bytes as base64 (standard alphabet), decimals as strings, everything else as it is."""
    import base64
    import datetime
    import decimal

    if isinstance(value, dict):
        return {key: json_native(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_native(inner) for inner in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value


def _parquet_rows(path, text_field="text"):
    """Each row as a JSON line. The text column must be a string column, or a binary one holding
    UTF-8 (decoded; a row whose bytes are not UTF-8 comes out as those bytes, which the record
    parser reports as invalid_utf8 at that row). Other columns: `json_native`."""
    import pyarrow.parquet as pq

    number = 0
    with fsspec.open(path, "rb") as stream:
        parquet = pq.ParquetFile(stream)
        schema = parquet.schema_arrow
        if text_field in schema.names:
            kind = str(schema.field(text_field).type)
            if kind not in STRING_TYPES + BINARY_TYPES:
                raise CorpusError(f"{path}: the text column {text_field!r} is of type {kind}, not a string "
                                  f"(or UTF-8 binary) column; name the right one with --text_field")
            binary = kind in BINARY_TYPES
        else:
            binary = False
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                text = row.get(text_field)
                if binary and text is not None:
                    try:
                        row[text_field] = bytes(text).decode("utf-8")
                    except UnicodeDecodeError:
                        yield number, bytes(text)  # parse_line: invalid_utf8, named by file and row
                        continue
                yield number, json.dumps({key: (value if key == text_field else json_native(value))
                                          for key, value in row.items()}, ensure_ascii=False).encode("utf-8")


# ----- outputs -------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(path, mode="wb"):
    """Open a temporary file next to `path`; on success fsync it and rename it to `path`, so a
    reader (or a rerun after SIGKILL) sees the whole file or none of it."""
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = os.path.join(os.path.dirname(path), f".tmp.{os.getpid()}.{os.path.basename(path)}")
    try:
        with open(temporary, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_arrays(path, **arrays):
    with atomic_output(path) as stream:
        np.savez(stream, **arrays)


def unit_cache_path(folder, unit) -> str:
    """Where the per-line results of a work unit are cached: named by the file and the part, never by
    the task, so that another --tasks/--workers finds them."""
    return os.path.join(folder, f"file_{unit.file_index:05d}.part_{unit.part:04d}_of_{unit.parts:04d}.npz")


def reuse_unit_cache(folder, unit) -> bool:
    """True if `unit`'s per-line results are cached: under its own name, or derived (and saved under
    its name) from another split of the same file whose parts are all cached. Every array of such a
    cache is per line, with a "lines" array, so any split can be cut from any other."""
    own = unit_cache_path(folder, unit)
    if os.path.exists(own):
        return True
    prefix = f"file_{unit.file_index:05d}.part_0000_of_"
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.startswith(prefix) or not name.endswith(".npz"):
            continue
        parts = int(name[len(prefix):-len(".npz")])
        paths = [unit_cache_path(folder, WorkUnit(0, unit.file_index, unit.path, part, parts)) for part in range(parts)]
        if not all(os.path.exists(path) for path in paths):
            continue
        try:
            loaded = [load_arrays(path) for path in paths]
        except DamagedCache:
            continue
        merged = {key: np.concatenate([arrays[key] for arrays in loaded]) for key in loaded[0]}
        order = np.argsort(merged["lines"], kind="stable")
        keep = order[(merged["lines"][order] - 1) % unit.parts == unit.part]
        save_arrays(own, **{key: values[keep] for key, values in merged.items()})
        return True
    return False


class DamagedCache(CorpusError):
    """A cache file that exists but cannot be read (cut short or overwritten by a disk problem)."""


def load_arrays(path, mmap_mode=None):
    """The arrays saved by `save_arrays` (a dict), or by np.save (one array, memory-mapped with
    mmap_mode="r"); a damaged file is `DamagedCache`, not an EOFError or an IndexError."""
    try:
        if str(path).endswith(".npy"):
            return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        with np.load(path, allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}
    except FileNotFoundError:
        raise CorpusError(f"{path}: missing; an earlier stage did not finish. Run the same command again") from None
    except Exception as error:  # zipfile.BadZipFile, EOFError, ValueError: truncated by a disk problem
        raise DamagedCache(f"{path}: damaged cache file ({type(error).__name__})") from None


def load_cached(path, stage_logging_dir, rank, mmap_mode=None):
    """`load_arrays` of a file that task `rank` of a stage wrote. A damaged file is removed with
    that task's completion marker, so that running the same command again rebuilds it."""
    try:
        return load_arrays(path, mmap_mode)
    except DamagedCache as error:
        os.remove(path)
        marker = os.path.join(stage_logging_dir, "completions", f"{rank:05d}")
        if os.path.exists(marker):
            os.remove(marker)
        raise DamagedCache(f"{error}; removed it and the completion mark of the task that wrote it "
                           f"({marker}): run the same command again to rebuild it") from None


def write_json(path, payload):
    with atomic_output(path, "w") as stream:
        json.dump(payload, stream, indent=2, ensure_ascii=False, default=str)
        stream.write("\n")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except FileNotFoundError:
        raise CorpusError(f"{path}: missing; an earlier stage did not finish. Run the same command again") from None
    except json.JSONDecodeError as error:
        raise CorpusError(f"{path}: damaged ({error.msg}); delete it and run again") from None


def line_hashes(file_key: int, lines) -> np.ndarray:
    """64 random bits for each line of a file: splitmix64 of (file key, line number). The same
    for a document whatever task, machine or executor computes it."""
    x = np.asarray(lines, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(file_key)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hash_to_uniform(file_key: int, lines) -> np.ndarray:
    """A uniform in (0, 1) for each line of a file, from the top 53 bits of `line_hashes`."""
    return ((line_hashes(file_key, lines) >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def file_key(seed, identity) -> int:
    """The per-file key of `line_hashes`: `identity` is `canonical_name(path)`, so the draws do not
    depend on how the path is spelled or where the data is mounted."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{identity}".encode(), digest_size=8).digest(), "little")
