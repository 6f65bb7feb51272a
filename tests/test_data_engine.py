"""toolkit/data_engine.py: executors, work units, streaming readers and atomic outputs."""

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dill
import numpy as np
import pytest

import select_data
from toolkit import data_engine, mixing, selection
from toolkit.corpus import BadRecord, CorpusError, parse_line

POOL_JA = "sample_data/pool/data/ja/ja_clean_0000.jsonl.gz"
POOL_EN = "sample_data/pool/data/en/en_clean_0000.jsonl.gz"
TARGET = "sample_data/target/ja_target.jsonl.gz"
FAKE_SLURM = Path(__file__).parent / "fixtures" / "fake_slurm"


def test_units_cover_every_line_once_whatever_the_task_count(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(f'{{"text": "{i}"}}\n' for i in range(10)))
    for tasks in (1, 3, 4, 7):
        units = data_engine.plan_units([str(path)], tasks)
        seen = sorted(line for rank in range(tasks) for unit in data_engine.units_of_rank(units, rank, tasks)
                      for line, _ in data_engine.iter_raw_lines(unit.path, unit.part, unit.parts))
        assert seen == list(range(1, 11))
    assert len(data_engine.plan_units(["a", "b", "c"], 2)) == 3  # enough files: one unit per file


def test_readers_keep_the_bytes_of_each_line_and_name_unreadable_files(tmp_path):
    lines = [b'{"text": "\xe6\x97\xa5\xe6\x9c\xac"}\n', b'{"text": "b"}\r\n', b'{"text": "no newline"}']
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"".join(lines))
    packed = tmp_path / "a.jsonl.gz"
    packed.write_bytes(gzip.compress(b"".join(lines)))
    for path in (plain, packed):
        assert [raw for _, raw in data_engine.iter_raw_lines(str(path))] == lines
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b"".join(lines) * 100)[:60])
    with pytest.raises(CorpusError, match="t.jsonl.gz: the gzip stream ends early"):
        list(data_engine.iter_raw_lines(str(truncated)))
    with pytest.raises(CorpusError, match="unknown format"):
        data_engine.resolve_inputs([str(tmp_path / "*.jsonl*"), str(_touch(tmp_path / "notes.txt"))])
    with pytest.raises(CorpusError, match="no such file"):
        data_engine.resolve_inputs([str(tmp_path / "missing.jsonl")])


def _touch(path):
    path.write_text("x")
    return path


def test_atomic_output_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out" / "file.npz"
    with pytest.raises(RuntimeError):
        with data_engine.atomic_output(target) as stream:
            stream.write(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and os.listdir(tmp_path / "out") == []
    data_engine.save_arrays(target, x=np.arange(3))
    assert data_engine.load_arrays(target)["x"].tolist() == [0, 1, 2]


def test_line_noise_is_a_function_of_seed_file_and_line_only():
    lines = np.arange(1, 1001)
    a = data_engine.hash_to_uniform(data_engine.file_key(0, "f.jsonl"), lines)
    assert np.array_equal(a[500:], data_engine.hash_to_uniform(data_engine.file_key(0, "f.jsonl"), lines[500:]))
    assert not np.array_equal(a, data_engine.hash_to_uniform(data_engine.file_key(1, "f.jsonl"), lines))
    assert 0 < a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.05


def test_the_stages_pickle_for_slurm_and_ray(tmp_path):
    # Slurm jobs load the executor with dill, Ray ships it with cloudpickle: the steps hold
    # paths and settings only, and must survive the trip.
    plan = selection.SelectionPlan(
        raw_paths=[POOL_JA], target_paths=[TARGET], units=data_engine.plan_units([POOL_JA], 2), tasks=2,
        featurizer={"featurizer": "japanese_char_ngrams"}, smoothing_alpha=1.0, text_field="text",
        skip_bad_records=False, num_ngrams_to_fit=None, decontaminate_against=[], decontamination_ngram=13,
        num_to_sample=5, seed=0, top_k=False, fit_dir=str(tmp_path / "fit"), draw_dir=str(tmp_path / "draw"),
        output_dir=str(tmp_path))
    for stage in selection.selection_stages(plan):
        restored = dill.loads(dill.dumps(stage.pipeline))
        assert type(restored[0]) is type(stage.pipeline[0]) and restored[0].plan == plan
    stages = mixing.mix_stages(mixing.MixPlan(
        [POOL_JA], [POOL_EN], mixing.plan_units([POOL_JA], [POOL_EN], 40), 40, "tok", 0.1, False, 0, None, "text",
        False, False, str(tmp_path / "c"), str(tmp_path / "t"), str(tmp_path), {"keys": {"mix": "k"}}))
    for stage in stages:
        restored = dill.loads(dill.dumps(stage.pipeline))
        assert type(restored[0]) is type(stage.pipeline[0])
    # no cap on the map stages: the bucket count comes from the corpus size at run time
    assert {stage.name: stage.tasks for stage in stages if stage.tasks > 1} == \
        {"count-ja": 40, "scatter": 40, "shuffle": 40}


def test_executor_arguments_are_checked():
    with pytest.raises(SystemExit, match="--slurm_partition"):
        data_engine.ExecutorArguments(executor="slurm").validate()
    with pytest.raises(SystemExit, match="--tasks must be at least 1"):
        data_engine.ExecutorArguments(tasks=0).validate()
    resolved = data_engine.ExecutorArguments(executor="slurm", slurm_partition="cpu").resolved(num_files=37)
    assert resolved.tasks == 37 and resolved.workers is None


@pytest.mark.slow
def test_slurm_job_arrays_select_the_same_set_as_local(tmp_path):
    # Real datatrove SlurmPipelineExecutor, real job scripts and pickled executors; only sbatch
    # and srun are stand-ins that run each array task at once, in order.
    common = ["--raw_datasets", POOL_JA, POOL_EN, "--target_datasets", TARGET, "--num_to_sample", "150",
              "--num_tokens_to_fit", "400000"]
    env = {**os.environ, "PATH": f"{FAKE_SLURM}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "scripts/select_data.py", *common, "--output_dir", str(tmp_path / "slurm"),
                             "--executor", "slurm", "--slurm_partition", "test", "--tasks", "2"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:] + (tmp_path / "slurm.log").read_text()[-3000:]
    assert "submitted to Slurm" in result.stdout
    assert (tmp_path / "slurm.log").read_text().count("task 1") >= 4  # the map stages ran as 2-task arrays
    select_data.main([*common, "--output_dir", str(tmp_path / "local"), "--tasks", "1", "--workers", "1"])
    slurm_report = json.loads((tmp_path / "slurm" / "selection_report.json").read_text())
    assert slurm_report["settings"]["executor"] == "slurm"
    for name in ("00000.jsonl.gz", "00001.jsonl.gz"):
        local_shard, slurm_shard = tmp_path / "local" / "selected" / name, tmp_path / "slurm" / "selected" / name
        assert local_shard.exists() == slurm_shard.exists()
        if local_shard.exists():
            assert local_shard.read_bytes() == slurm_shard.read_bytes()


def test_a_failed_task_s_error_is_read_back_from_its_log(tmp_path):
    # Ray logs a failing task and goes on; run_stages then reports the task's own message.
    from loguru import logger

    (tmp_path / "logs").mkdir()
    sink = logger.add(tmp_path / "logs" / "task_00003.log", level="DEBUG", colorize=False)
    try:
        raise CorpusError("pool.jsonl:7: 'text' is int, not a string (pass --skip_bad_records ...)")
    except CorpusError as error:
        logger.exception(error)
    finally:
        logger.remove(sink)
    assert data_engine.task_error(tmp_path, [1, 3]) == \
        "pool.jsonl:7: 'text' is int, not a string (pass --skip_bad_records ...)"
    assert data_engine.task_error(tmp_path, [1]) is None


# ----- issue 20: inputs at MADLAD scale -------------------------------------------------------
def _jsonl_lines(count):
    return [json.dumps({"text": f"文書 {i} " + "あいうえお" * (i % 7 + 1)}, ensure_ascii=False).encode() + b"\n"
            for i in range(count)]


def _zstd_frames(lines, per_frame):
    import zstandard

    compressor = zstandard.ZstdCompressor()
    return b"".join(compressor.compress(b"".join(lines[i:i + per_frame])) for i in range(0, len(lines), per_frame))


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_a_truncated_stream_is_an_error_naming_the_file_and_byte_offset(tmp_path, suffix):
    lines = _jsonl_lines(1510)
    whole = _zstd_frames(lines, 200) if suffix.endswith(".zst") else gzip.compress(b"".join(lines))
    path = tmp_path / f"whole{suffix}"
    path.write_bytes(whole)
    assert [raw for _, raw in data_engine.iter_raw_lines(str(path))] == lines  # several frames / members read whole
    # a cut inside a frame (mid-file) and a cut a few bytes before the end (mid-line of the last frame)
    for cut in (len(whole) // 2, len(whole) - 7):
        cut_path = tmp_path / f"cut_{cut}{suffix}"
        cut_path.write_bytes(whole[:cut])
        read = []
        with pytest.raises(CorpusError, match=rf"cut_{cut}{suffix}: the .* stream ends early at byte {cut:,}"):
            for _, raw in data_engine.iter_raw_lines(str(cut_path)):
                read.append(raw)
        assert read == lines[:len(read)] and len(read) < len(lines)  # never a partial line passed on


def test_parquet_values_keep_json_types(tmp_path):
    import base64
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    moment = datetime.datetime(2024, 5, 1, 12, 30, 5)
    table = pa.table({"text": pa.array(["日本語の文書".encode(), b"\xff\xfe broken", "二つ目".encode()], pa.binary()),
                      "when": pa.array([moment] * 3, pa.timestamp("s")),
                      "blob": pa.array([b"\x00\x01", b"", b"abc"], pa.binary()),
                      "score": pa.array([0.5, 1.0, None])})
    path = tmp_path / "typed.parquet"
    pq.write_table(table, path)
    rows = list(data_engine.iter_raw_lines(str(path)))
    first = parse_line(rows[0][1])
    assert first == {"text": "日本語の文書", "when": "2024-05-01T12:30:05", "blob": base64.b64encode(b"\x00\x01").decode(),
                     "score": 0.5}
    with pytest.raises(BadRecord) as bad:  # not UTF-8: the row's own error (file:row, or a counted skip)
        parse_line(rows[1][1])
    assert bad.value.reason == "invalid_utf8" and rows[1][0] == 2
    assert parse_line(rows[2][1])["text"] == "二つ目"
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), tmp_path / "numbers.parquet")
    with pytest.raises(CorpusError, match="numbers.parquet: the text column 'text' is of type int64, not a string"):
        list(data_engine.iter_raw_lines(str(tmp_path / "numbers.parquet")))


def test_temporaries_never_match_and_duplicates_are_one_file(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "00000.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    (folder / ".tmp.123.00001.jsonl.gz").write_bytes(b"\x1f\x8b partial")  # a killed writer's file
    for pattern in (f"{folder}/*.jsonl.gz", f"file://{folder}/*.jsonl.gz"):
        assert [os.path.basename(p) for p in data_engine.resolve_inputs([pattern])] == ["00000.jsonl.gz"]
    assert data_engine.final_files(folder) == ["00000.jsonl.gz"]
    assert data_engine.remove_temporaries(folder) == 1 and os.listdir(folder) == ["00000.jsonl.gz"]
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    spellings = ["data/00000.jsonl.gz", "./data/00000.jsonl.gz", f"{folder}/../data/00000.jsonl.gz",
                 "link/00000.jsonl.gz", f"file://{folder}/00000.jsonl.gz"]
    kept, repeats = data_engine.dedupe_inputs(spellings)
    assert kept == spellings[:1] and repeats == spellings[1:]
    assert len({data_engine.canonical_name(path) for path in spellings}) == 1  # the noise key of every spelling


def test_output_folders_that_cannot_work_are_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--output_dir .*file is a file, not a folder"):
        data_engine.check_output_dir(str(tmp_path / "file"), [])
    with pytest.raises(SystemExit, match="cannot be written"):
        data_engine.check_output_dir("/proc/1/no/such/folder", [])
    (tmp_path / "out" / "selected").mkdir(parents=True)
    (tmp_path / "out" / "selected" / "00000.jsonl.gz").write_text("x")
    with pytest.raises(SystemExit, match="00000.jsonl.gz is inside --output_dir"):
        data_engine.check_output_dir(str(tmp_path / "out"), [str(tmp_path / "out" / "selected" / "00000.jsonl.gz")])
    data_engine.check_output_dir(str(tmp_path / "elsewhere"), [str(tmp_path / "out" / "selected" / "00000.jsonl.gz")])


def test_forked_workers_die_with_their_parent_whatever_kills_it(tmp_path):
    # The parent forks a pool worker and a multiprocessing Manager (what datatrove's local executor
    # starts), prints their pids and waits; SIGKILL of the parent alone must take them down.
    script = ("import os, sys, time, multiprocess as mp; sys.path.insert(0, 'scripts')\n"
              "from toolkit.data_engine import die_with_this_process\n"
              "die_with_this_process()\n"
              "ctx = mp.get_context('fork'); manager = ctx.Manager(); pool = ctx.Pool(2)\n"
              "print(*pool.map(lambda _: (time.sleep(0.2), os.getpid())[1], range(4)), manager._process.pid, flush=True)\n"
              "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    children = {int(pid) for pid in process.stdout.readline().split()}
    assert len(children) >= 2
    os.kill(process.pid, 9)
    process.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
