#!/usr/bin/env python
"""The ablation's speed measurement: forced decoding of the same reference text against timing
free generation, on the same arms, prompts, batch and device, in one process.

    python benchmarks/bench_decoding_speed.py --tokenizer outputs/demo/tokenizer \\
        --output_dir outputs/bench_decoding_speed

Arms: the base model twice ("base", "continued": the demo's three arms have two models with
the base tokenizer) and the base with `--tokenizer` (an extended tokenizer) and its embeddings
extended by `subword_mean` ("extended"); untrained, which does not matter to forced decoding's
speed (the same architecture and vocabulary as the demo's arms) but does to what free
generation writes. Reports, per way of measuring:

1. free generation timed (the old measurement): characters/s, tokens/s, characters/token
   written, with a warm-up and `--repeats` interleaved rounds; its characters/s ratio;
2. forced decoding (the ablation's measurement) + one free generation described: the same
   figures on the reference text, and the ratios with their two factors;
3. wall and CPU seconds of each way (CPU seconds: the process's, all threads), so that the
   cost of the demo's speed phase can be compared on a shared machine.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets
from toolkit.corpus import read_texts
from toolkit.embeddings import extend_embeddings
from toolkit.quiet import quiet_by_default
from toolkit.reports import write_json_atomic
from toolkit.speed import GreedyWriter, forced_decoding_speeds, free_generation, speed_ratio


@dataclass
class BenchArguments:
    tokenizer: str = field(metadata={"help": "An extended tokenizer of --model's (e.g. outputs/demo/tokenizer)."})
    model: str = field(default="offline:smollm2-135m")
    eval_files: list[str] = field(default_factory=lambda: ["sample_data/eval/ja_eval.jsonl.gz"])
    prompts: int = field(default=4)
    prompt_characters: int = field(default=64)
    reference_characters: int = field(default=32, metadata={"help": "Forced decoding (the demo's setting)."})
    free_characters: int = field(default=24, metadata={"help": "Free generation, described once (the demo's setting)."})
    old_new_characters: int = field(default=48, metadata={"help": "The old timed free generation (the old demo's)."})
    batch_size: int = field(default=8)
    repeats: int = field(default=3)
    skip_old: bool = field(default=False, metadata={"help": "Measure only the new phase."})
    output_dir: str = field(default="outputs/bench_decoding_speed")


def timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def old_free_generation_speeds(arms, prompts, new_characters, batch_size, repeats):
    """The measurement the ablation used before: characters/s of free greedy generation."""
    writers = {name: GreedyWriter(model, tokenizer, prompts, new_characters, batch_size)
               for name, (model, tokenizer) in arms.items()}
    for writer in writers.values():
        writer()
    names, rounds = list(writers), {name: [] for name in writers}
    for round_number in range(repeats):
        for name in names[round_number % len(names):] + names[: round_number % len(names)]:
            rounds[name].append(writers[name]())
    speeds = {}
    for name, runs in rounds.items():
        seconds, characters, tokens = sorted(runs)[len(runs) // 2]
        speeds[name] = {"characters_per_second": characters / seconds, "tokens_per_second": tokens / seconds,
                        "characters_per_token": characters / tokens}
    return speeds


def main():
    quiet_by_default()
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    path = assets.resolve(args.model)
    base_tokenizer = AutoTokenizer.from_pretrained(path)
    extended_tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    extended = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    extend_embeddings(extended, extended_tokenizer, base_tokenizer, init="subword_mean")
    arms = {"base": (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), base_tokenizer),
            "continued": (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), base_tokenizer),
            "extended": (extended.eval(), extended_tokenizer)}
    texts, _ = read_texts(args.eval_files)
    need = args.prompt_characters + args.reference_characters
    chosen = [text for text in texts if len(text) >= need][: args.prompts]
    prompts = [text[: args.prompt_characters] for text in chosen]
    references = [text[args.prompt_characters: need] for text in chosen]

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "tokenizer": args.tokenizer, "prompts": len(prompts), "batch_size": args.batch_size,
              "repeats": args.repeats, "torch_threads": torch.get_num_threads()}
    # the new phase first, written as soon as it is measured (on a loaded machine the old one is slow)
    forced, forced_wall, forced_cpu = timed(lambda: forced_decoding_speeds(arms, prompts, references, args.batch_size,
                                                                           args.repeats))
    written, free_wall, free_cpu = timed(lambda: {name: free_generation(model, tokenizer, prompts, args.free_characters,
                                                                        args.batch_size)
                                                  for name, (model, tokenizer) in arms.items()})
    ratios = {effect: speed_ratio(forced, a, b) for effect, a, b in
              (("data", "continued", "base"), ("tokenizer", "extended", "continued"))}
    report["forced_decoding"] = {
        "speeds": {n: {k: v for k, v in s.items() if k != "rounds_seconds"} for n, s in forced.items()},
        "ratios": ratios, "reference_characters": args.reference_characters, "wall_seconds": forced_wall,
        "cpu_seconds": forced_cpu}
    report["free_generation_described"] = {
        "characters_per_token": {n: w["characters_per_token"] for n, w in written.items()},
        "new_characters": args.free_characters, "wall_seconds": free_wall, "cpu_seconds": free_cpu}
    write_json_atomic(output / "bench_decoding_speed.json", report)
    for name in arms:
        f = forced[name]
        print(f"{name:10s} forced: {f['characters_per_second']:7.1f} ref chars/s {f['tokens_per_second']:7.1f} tok/s "
              f"{f['characters_per_token']:.2f} chars/tok | free (described) "
              f"{written[name]['characters_per_token']:.2f} chars/tok written", flush=True)
    for effect, r in ratios.items():
        print(f"{effect}: {r['characters_per_second']:.2f}x = {r['tokens_per_second']:.2f}x tok/s x "
              f"{r['characters_per_token']:.2f}x chars/tok", flush=True)
    print(f"new phase: forced {forced_wall:.1f} s ({forced_cpu:.1f} CPU-s) + free described {free_wall:.1f} s "
          f"({free_cpu:.1f} CPU-s)", flush=True)
    if args.skip_old:
        return
    old, old_wall, old_cpu = timed(lambda: old_free_generation_speeds(arms, prompts, args.old_new_characters,
                                                                       args.batch_size, args.repeats))
    report["old_free_generation_timed"] = {
        "speeds": old, "new_characters": args.old_new_characters,
        "tokenizer_ratio_characters_per_second":
            old["extended"]["characters_per_second"] / old["continued"]["characters_per_second"],
        "wall_seconds": old_wall, "cpu_seconds": old_cpu}
    report["new_over_old_cpu_seconds"] = (forced_cpu + free_cpu) / old_cpu
    report["new_over_old_wall_seconds"] = (forced_wall + free_wall) / old_wall
    write_json_atomic(output / "bench_decoding_speed.json", report)
    for name in arms:
        o = old[name]
        print(f"{name:10s} old free: {o['characters_per_second']:7.1f} chars/s {o['characters_per_token']:.2f} "
              f"chars/tok written")
    print(f"old phase: {old_wall:.1f} s wall, {old_cpu:.1f} CPU-s; new/old CPU-s {report['new_over_old_cpu_seconds']:.2f}")

if __name__ == "__main__":
    main()
