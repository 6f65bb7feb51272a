#!/usr/bin/env python
"""Scale rehearsal of scripts/select_data.py: pools of 1x, 10x and 100x the bundled one.

Each copy of a bundled pool file gets a distinct sentence appended to every document, so
no two documents of the large pools are equal (DSIR and the accounting see distinct
documents, the hashing does real work). For each size the selection runs as a
subprocess on the local executor; recorded: wall time, documents read, docs/s/core
(documents / wall / workers), docs per CPU-second of all its processes (robust to other
load on a shared machine), the 1-minute load average before and after, the peak RSS (VmHWM) of every process of the run (polled
from /proc) and the largest peak among them (getrusage of the waited-for children).

With --baseline_scripts (a `scripts/` folder of an older version, e.g. main at 2e14431
exported with `git archive 2e14431 scripts | tar -x -C /tmp/base`), the same pool of
--baseline_scale is also selected by that version on one process (--num_proc 1) and by
this one on one task and one worker, in the same session: the docs/s/core ratio.

    python benchmarks/scale_rehearsal_select.py --output_dir outputs/scale_select \\
        --scales 1 10 100 --workers 2 --baseline_scripts /tmp/base/scripts --baseline_scale 10
"""

import gzip
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit.reports import write_json_atomic  # noqa: E402
from toolkit.quiet import quiet_by_default  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RehearsalArguments:
    output_dir: str = field(default="outputs/scale_select")
    pool: list[str] = field(default_factory=lambda: ["sample_data/pool/data/ja/ja_clean_0000.jsonl.gz",
                                                     "sample_data/pool/data/en/en_clean_0000.jsonl.gz"])
    target: str = field(default="sample_data/target/ja_target.jsonl.gz")
    scales: list[int] = field(default_factory=lambda: [1, 10, 100])
    workers: int = field(default=2)
    select_fraction: float = field(default=0.2, metadata={"help": "K as a share of the pool's documents."})
    baseline_scripts: str = field(default=None, metadata={"help": "scripts/ of the version to compare with."})
    baseline_scale: int = field(default=10)
    baseline_args: str = field(default="--num_proc 1 --no_progress", metadata={
        "help": "How the baseline runs on one process (a datatrove-era baseline: '--tasks 1 --workers 1')."})
    baseline_rounds: int = field(default=1, metadata={"help": "Interleaved baseline/this rounds (best of each kept)."})


def build_pool(args, scale) -> list:
    """`scale` perturbed copies of each bundled pool file, as <name>_copyNNNN.jsonl.gz."""
    folder = Path(args.output_dir) / f"pool_{scale}x"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in args.pool:
        with gzip.open(REPO / source, "rt", encoding="utf-8") as stream:
            records = [json.loads(line) for line in stream]
        stem = Path(source).name.removesuffix(".jsonl.gz")
        for copy in range(scale):
            path = folder / f"{stem}_copy{copy:04d}.jsonl.gz"
            paths.append(str(path))
            if path.exists():
                continue
            temporary = path.with_name(".tmp." + path.name)
            with gzip.open(temporary, "wt", encoding="utf-8", compresslevel=6) as out:
                for index, record in enumerate(records):
                    note = f"\n(copy {copy}, document {index}: 写し {copy} 番の {index} 番目)" if copy else ""
                    out.write(json.dumps({**record, "text": record["text"] + note}, ensure_ascii=False) + "\n")
            os.replace(temporary, path)
    return paths


def process_tree(root_pid):
    """Pids of root_pid and all its descendants (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    parent = int(stream.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def peak_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measured_run(command):
    """Run `command`; wall time, CPU seconds of all its processes, the load average around it, the
    peak RSS of every process seen, and the largest peak (rusage of the waited-for children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    peaks = {}
    while process.poll() is None:
        for pid in process_tree(process.pid):
            peak = peak_rss_kib(pid)
            if peak:
                peaks[pid] = max(peaks.get(pid, 0), peak)
        time.sleep(0.1)
    wall = time.perf_counter() - started
    output = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    largest, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime - cpu_before
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)], "peak_rss_mib_per_process": sorted(round(v / 1024, 1) for v in peaks.values()),
            "processes_seen": len(peaks),
            "largest_peak_rss_mib": round(max(largest, max(peaks.values(), default=0)) / 1024, 1)
            if largest > before else round(max(peaks.values(), default=0) / 1024, 1)}


def select_command(scripts, paths, args, out, k, extra):
    return [sys.executable, str(Path(scripts) / "select_data.py"), "--raw_datasets", *paths,
            "--target_datasets", args.target, "--num_to_sample", str(k), "--output_dir", out, *extra]


def documents_in(paths):
    total = 0
    for path in paths:
        with gzip.open(path, "rb") as stream:
            total += sum(1 for _ in stream)
    return total


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(RehearsalArguments).parse_args_into_dataclasses()
    os.makedirs(args.output_dir, exist_ok=True)
    results = {"machine": f"{len(os.sched_getaffinity(0))} cores", "workers": args.workers, "scales": [],
               "single_process": None}
    for scale in args.scales:
        paths = build_pool(args, scale)
        documents = documents_in(paths)
        k = max(1, int(documents * args.select_fraction))
        out = os.path.join(args.output_dir, f"run_{scale}x")
        subprocess.run(["rm", "-rf", out], check=True)
        run = measured_run(select_command(REPO / "scripts", paths, args, out, k,
                                          ["--workers", str(args.workers), "--tasks", str(args.workers)]))
        row = {"scale": scale, "files": len(paths), "documents": documents, "num_to_sample": k, **run,
               "docs_per_s_per_core": round(documents / run["wall_s"] / args.workers, 1),
               "docs_per_cpu_s": round(documents / run["cpu_s"], 1)}
        results["scales"].append(row)
        print(json.dumps(row), flush=True)
    if args.baseline_scripts:
        paths = build_pool(args, args.baseline_scale)
        documents = documents_in(paths)
        k = max(1, int(documents * args.select_fraction))
        rows = {}
        for _ in range(args.baseline_rounds):  # interleaved: both see the same load
            for name, scripts, extra in (
                    ("baseline", args.baseline_scripts, args.baseline_args.split()),
                    ("datatrove_local_1_task", REPO / "scripts", ["--workers", "1", "--tasks", "1"])):
                out = os.path.join(args.output_dir, f"single_{name}")
                subprocess.run(["rm", "-rf", out], check=True)
                run = measured_run(select_command(scripts, paths, args, out, k, extra))
                row = {**run, "docs_per_s_per_core": round(documents / run["wall_s"], 1),
                       "docs_per_cpu_s": round(documents / run["cpu_s"], 1)}
                if name not in rows or row["docs_per_cpu_s"] > rows[name]["docs_per_cpu_s"]:
                    rows[name] = row
                print(name, json.dumps(row), flush=True)
        results["single_process"] = {"scale": args.baseline_scale, "documents": documents, **rows,
                                     "ratio_docs_per_s_per_core": round(
                                         rows["datatrove_local_1_task"]["docs_per_s_per_core"]
                                         / rows["baseline"]["docs_per_s_per_core"], 3),
                                     "ratio_docs_per_cpu_s": round(rows["datatrove_local_1_task"]["docs_per_cpu_s"]
                                                                   / rows["baseline"]["docs_per_cpu_s"], 3)}
    first, last = results["scales"][0], results["scales"][-1]
    results["peak_rss_ratio_largest_vs_smallest"] = round(last["largest_peak_rss_mib"] / first["largest_peak_rss_mib"], 3)
    write_json_atomic(os.path.join(args.output_dir, "scale_rehearsal_select.json"), results)
    print(json.dumps({k: v for k, v in results.items() if k != "scales"}, indent=1))


if __name__ == "__main__":
    main()
