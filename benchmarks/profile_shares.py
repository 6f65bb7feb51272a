#!/usr/bin/env python
"""Where a stage's time goes: shares of py-spy samples by phase, over all its processes.

Record a stage (every process of an `accelerate launch` included) with py-spy's raw output,
then read it with this script:

    pip install py-spy
    py-spy record --subprocesses --format raw -r 20 -o stage.txt -- \\
        .venv/bin/python -m accelerate.commands.launch --config_file accelerate_configs/cpu_zero3_2proc.yaml \\
        scripts/pretrain.py ...
    python benchmarks/profile_shares.py --profiles stage.txt

A sample is one stack of one thread at one instant, so a share is a share of the time the
processes spent running or waiting to run (idle threads, such as tqdm's monitor, are
listed on their own line). On a shared machine the shares stay meaningful where seconds do
not: every phase is slowed alike. The phases are matched on the function names of
`scripts/` (first match wins); inside the training loop and the final evaluation, the
samples are split again by what they were doing (matmuls, ZeRO-3 collectives, the optimizer).
"""

import collections
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from toolkit.quiet import quiet_by_default  # noqa: E402

PHASES = [
    ("idle thread (tqdm monitor)", ("TMonitor",)),
    ("training loop", ("train (toolkit/training.py",)),
    ("final evaluation", ("evaluate (pretrain.py", "evaluate_model (")),
    ("imports", ("_find_and_load",)),
    ("accelerator.prepare (DeepSpeed init)", (".prepare (",)),
    ("model loading", ("from_pretrained",)),
    ("embedding init", ("extend_embeddings",)),
    ("consolidated save", ("save_consolidated",)),
    ("input checks", ("check_inputs",)),
]
# leaf frames of the training loop and evaluation, innermost first
WORK = [
    ("ZeRO-3 reduce-scatter", ("reduce_scatter",)),
    ("ZeRO-3 parameter fetch/release", ("all_gather", "allgather", "fetch_sub_module", "release_sub_module")),
    ("optimizer step", ("step (",)),
    ("matmuls (linear)", ("linear",)),
    ("other forward", ("forward",)),
    ("other backward", ("backward",)),
]


@dataclass
class Arguments:
    profiles: list[str] = field(metadata={"help": "py-spy raw outputs (`--format raw`)."})


def classify(stack, rules, default="other"):
    for name, needles in rules:
        if any(needle in stack for needle in needles):
            return name
    return default


def leaf_kind(stack):
    for frame in reversed(stack.split(";")):
        kind = classify(frame.lower() if "step (" not in frame else frame, WORK, default=None)
        if kind:
            return kind
    return "other"


def shares(path):
    phases, work = collections.Counter(), collections.defaultdict(collections.Counter)
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, 1):
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                raise SystemExit(f"{path}:{line_number}: not py-spy raw output ('<stack> <count>' per line)")
            phase = classify(stack, PHASES)
            # an import inside the loop (lazy imports) belongs to the loop
            if phase == "imports" and ("train (toolkit/training.py" in stack or "evaluate (" in stack):
                phase = classify(stack, PHASES[1:3])
            phases[phase] += int(count)
            if phase in ("training loop", "final evaluation"):
                work[phase][leaf_kind(stack)] += int(count)
    return phases, work


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    for path in args.profiles:
        phases, work = shares(path)
        total = sum(phases.values())
        print(f"\n{path}: {total} samples")
        for phase, count in phases.most_common():
            print(f"  {phase:<40} {100 * count / total:5.1f}%")
            for kind, part in work.get(phase, collections.Counter()).most_common():
                print(f"      {kind:<36} {100 * part / count:5.1f}% of it")


if __name__ == "__main__":
    main()
