#!/usr/bin/env python
"""Scale rehearsal: tokenise 1x, 10x, 100x the bundled corpus into token shards, then start pretrain.py
on each; peak memory and time to the first step must not grow with the corpus.

    python benchmarks/scale_rehearsal_pretrain.py --scales 1,10,100 --output_dir outputs/scale_rehearsal

For each scale N: N copies of a demo-size mix (the first 600 Japanese and 60 English documents of
sample_data/pool, ~1.2 M characters; the demo's mix is 600 selected JA documents + ~10% EN) as N
JSONL files; `toolkit.token_shards.tokenize_locally` (the datatrove steps the mix
stage runs; 2 tasks, one worker) in a child process; then `scripts/pretrain.py` (one process,
offline:tiny-mistral, block 1024, 1 step, no evaluation) on the shards in a child process. Peak RSS
is each child's own `ru_maxrss` (os.wait4); time to first step is pretrain.py's own
`seconds_to_first_step` (process start to the end of step 1, from its report). The text files are
deleted after tokenising (the shards stay until the end). Writes scale_rehearsal.json.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from toolkit.reports import write_json_atomic  # noqa: E402
from toolkit.quiet import quiet_by_default  # noqa: E402

POOL = [REPO / "sample_data/pool/data/ja/ja_clean_0000.jsonl.gz", REPO / "sample_data/pool/data/en/en_clean_0000.jsonl.gz"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}


@dataclass
class RehearsalArguments:
    output_dir: str = field(default="outputs/scale_rehearsal")
    scales: str = field(default="1,10,100", metadata={"help": "Corpus sizes, in copies of the bundled pool."})
    model_name_or_path: str = field(default="offline:tiny-mistral")
    block_size: int = field(default=1024)
    tasks: int = field(default=2)


def run_child(command) -> dict:
    """Run a child process; its own peak RSS (MiB) and wall seconds; fail loudly with its output."""
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{output.decode()[-4000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_seconds": time.time() - started}


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(RehearsalArguments).parse_args_into_dataclasses()
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    ja, en = (gzip.open(path).read().splitlines(keepends=True) for path in POOL)
    pool = b"".join(ja[:600] + en[:60])
    rows = []
    for scale in map(int, args.scales.split(",")):
        text_dir, token_dir, run_dir = root / f"text-{scale}x", root / f"tokens-{scale}x", root / f"pretrain-{scale}x"
        for folder in (text_dir, token_dir, run_dir):
            shutil.rmtree(folder, ignore_errors=True)
        text_dir.mkdir(parents=True)
        files = []
        for copy in range(scale):
            files.append(text_dir / f"part-{copy:04d}.jsonl")
            files[-1].write_bytes(pool)
        tokenize = run_child([sys.executable, "-c",
                              "import sys; sys.path.insert(0, 'scripts'); from toolkit.token_shards import tokenize_locally; "
                              f"tokenize_locally({[str(f) for f in files]!r}, {args.model_name_or_path!r}, "
                              f"{str(token_dir)!r}, tasks={args.tasks})"])
        shutil.rmtree(text_dir)
        manifest = json.loads((token_dir / "token_shards.json").read_text())
        pretrain = run_child([sys.executable, "scripts/pretrain.py", "--model_name_or_path", args.model_name_or_path,
                              "--tokenizer_name", args.model_name_or_path, "--train_token_dir", str(token_dir),
                              "--block_size", str(args.block_size), "--per_device_train_batch_size", "2",
                              "--max_train_steps", "1", "--eval_at_start", "false", "--report_to", "none",
                              "--save_dtype", "float32", "--output_dir", str(run_dir)])
        report = json.loads((run_dir / "training_report.json").read_text())
        rows.append({
            "scale": scale, "documents": manifest["documents"], "tokens": manifest["tokens"],
            "characters": manifest["characters"], "shard_files": len(manifest["files"]),
            "shard_mib": sum((token_dir / f["name"]).stat().st_size for f in manifest["files"]) / 2**20,
            "tokenize_peak_rss_mib": tokenize["peak_rss_mib"], "tokenize_seconds": tokenize["wall_seconds"],
            "tokens_per_second_tokenizing": manifest["tokens"] / tokenize["wall_seconds"],
            "pretrain_peak_rss_mib": pretrain["peak_rss_mib"], "pretrain_wall_seconds": pretrain["wall_seconds"],
            "seconds_to_first_step": report["seconds_to_first_step"], "blocks": report["data"]["blocks"],
        })
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(run_dir)
    first = rows[0]
    for row in rows:
        for key in ("tokenize_peak_rss_mib", "pretrain_peak_rss_mib", "seconds_to_first_step"):
            row[f"{key}_vs_{first['scale']}x"] = row[key] / first[key]
    for scale in args.scales.split(","):
        shutil.rmtree(root / f"tokens-{scale}x", ignore_errors=True)
    write_json_atomic(root / "scale_rehearsal.json", {"arguments": vars(args), "rows": rows})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
