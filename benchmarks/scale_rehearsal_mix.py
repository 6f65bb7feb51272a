#!/usr/bin/env python
"""Scale rehearsal of scripts/mix_corpus.py: mixes of 1x, 10x and 100x the bundled pool.

Japanese: N perturbed copies of the bundled Japanese pool file; English: N perturbed copies of
the bundled English one (`scale_rehearsal_select.build_pool`: every document of copy c gets a
distinct closing sentence). Each size is mixed by `mix_corpus.py --workers W --tasks W` with the
Mistral tokenizer at a 10% English share, as a subprocess; recorded: wall time, CPU seconds of
all its processes, the peak RSS (VmHWM) of every process (polled from /proc), the shuffle bucket
count, and the English tokens the count stage tokenised against the English tokens the mix uses.

    python benchmarks/scale_rehearsal_mix.py --output_dir outputs/scale_mix --scales 1 10 100 --workers 2
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from scale_rehearsal_select import REPO, build_pool, measured_run  # noqa: E402
from toolkit.quiet import quiet_by_default  # noqa: E402
from toolkit.reports import write_json_atomic  # noqa: E402


@dataclass
class RehearsalArguments:
    output_dir: str = field(default="outputs/scale_mix")
    japanese: str = field(default="sample_data/pool/data/ja/ja_clean_0000.jsonl.gz")
    english: str = field(default="sample_data/pool/data/en/en_clean_0000.jsonl.gz")
    tokenizer: str = field(default="offline:mistral-7b-tokenizer")
    english_token_share: float = field(default=0.1)
    scales: list[int] = field(default_factory=lambda: [1, 10, 100])
    workers: int = field(default=2)
    shuffle_bucket_mb: float = field(default=None, metadata={"help": "Passed on when set (default: the script's)."})
    scripts: str = field(default=None, metadata={
        "help": "scripts/ of another version to rehearse (e.g. main before issue 20, for a baseline in the same "
                "session); default this checkout's."})
    documents_per_file: int = field(default=None, metadata={
        "help": "Take only the first N documents of each bundled file as the 1x unit (a shared 2-core machine "
                "cannot tokenise 100x the whole pool twice in reasonable time)."})


def main():
    quiet_by_default()
    (args,) = HfArgumentParser(RehearsalArguments).parse_args_into_dataclasses()
    os.makedirs(args.output_dir, exist_ok=True)
    results = {"machine": f"{len(os.sched_getaffinity(0))} cores", "workers": args.workers, "scales": []}
    for scale in args.scales:
        pools = {}
        for side, source in (("ja", args.japanese), ("en", args.english)):
            source = head_of(source, args.documents_per_file, os.path.join(args.output_dir, f"{side}_source"))
            pools[side] = build_pool(argparse_like(args, source, os.path.join(args.output_dir, side)), scale)
        out = os.path.join(args.output_dir, f"run_{scale}x")
        subprocess.run(["rm", "-rf", out], check=True)
        command = [sys.executable, str(Path(args.scripts or REPO / "scripts") / "mix_corpus.py"), "--japanese_files", *pools["ja"],
                   "--english_files", *pools["en"], "--tokenizer", args.tokenizer, "--output_dir", out,
                   "--english_token_share", str(args.english_token_share), "--workers", str(args.workers),
                   "--tasks", str(args.workers)]
        if args.shuffle_bucket_mb:
            command += ["--shuffle_bucket_mb", str(args.shuffle_bucket_mb)]
        run = measured_run(command)
        report = json.loads(Path(out, "mix_report.json").read_text())
        share, shuffle = report["english_share"], report.get("shuffle", {})  # an older version reports less
        counted = share.get("english_tokens_counted")
        row = {"scale": scale, "files": {side: len(paths) for side, paths in pools.items()},
               "documents": report["documents"], "tokens": report["tokens"], **run,
               "shuffle_buckets": shuffle.get("buckets", report["settings"].get("shuffle_buckets")),
               "kept_mib": round(shuffle["kept_bytes"] / 2**20, 1) if shuffle else None,
               "english_tokens_used": report["tokens"]["en"], "english_tokens_counted": counted,
               "english_counted_over_used": round(counted / max(1, report["tokens"]["en"]), 4) if counted else None,
               "stages_s": report["timing_s"]["stages_s"]}
        results["scales"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "peak_rss_mib_per_process"}), flush=True)
    first, last = results["scales"][0], results["scales"][-1]
    results["peak_rss_ratio_largest_vs_smallest"] = round(last["largest_peak_rss_mib"] / first["largest_peak_rss_mib"], 3)
    results["peak_rss_ratio_per_process_rank"] = [
        round(b / a, 3) for a, b in zip(sorted(first["peak_rss_mib_per_process"], reverse=True),
                                        sorted(last["peak_rss_mib_per_process"], reverse=True))]
    write_json_atomic(os.path.join(args.output_dir, "scale_rehearsal_mix.json"), results)
    print(json.dumps({k: v for k, v in results.items() if k != "scales"}, indent=1))


def head_of(source, documents, folder):
    """The first `documents` lines of `source` as a .jsonl.gz of the same name (all of it if None)."""
    if not documents:
        return source
    import gzip

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.path.abspath(folder), os.path.basename(source))
    if not os.path.exists(path):
        with gzip.open(REPO / source, "rb") as stream, gzip.open(path + ".part", "wb") as out:
            for _, line in zip(range(documents), stream):
                out.write(line)
        os.replace(path + ".part", path)
    return path


def argparse_like(args, source, folder):
    """What `build_pool` reads: the files to copy and where the copies go."""
    from types import SimpleNamespace

    return SimpleNamespace(pool=[source], output_dir=folder)


if __name__ == "__main__":
    main()
