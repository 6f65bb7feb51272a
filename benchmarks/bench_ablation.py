#!/usr/bin/env python
"""Measure multiple-choice scoring: shared-prefix KV cache vs one pass per option.

    python benchmarks/bench_ablation.py --model offline:smollm2-135m --task sample_data/tasks/continuation_mc.jsonl \\
        --max_examples 8 --output_dir outputs/bench_ablation

Both ways run in the same process on the same questions; the report gives seconds,
the ratio, and the largest score difference (they must agree).
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets
from toolkit.chat import chat_template, prompt_text
from toolkit.evaluation import continuation_logprobs, read_task
from toolkit.reports import write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class BenchArguments:
    model: str = field(default="offline:smollm2-135m")
    task: str = field(default="sample_data/tasks/continuation_mc.jsonl")
    max_examples: int = field(default=8)
    output_dir: str = field(default="outputs/bench_ablation")


@torch.no_grad()
def one_pass_per_option(model, tokenizer, context, options):
    scores = []
    for option in options:
        encoding = tokenizer(context + option, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        first = next(i for i, (_, end) in enumerate(encoding["offset_mapping"]) if end > len(context))
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(first, len(ids))))
    return scores


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    path = assets.resolve(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = chat_template(tokenizer)
    examples = read_task(args.task, args.max_examples).examples
    contexts = [prompt_text(tokenizer, e["prompt"], template) for e in examples]
    continuation_logprobs(model, tokenizer, contexts[0], examples[0]["choices"])  # warm-up
    timings, scores = {}, {}
    for name, scorer in [("one_pass_per_option", one_pass_per_option), ("shared_prefix_cache", continuation_logprobs)]:
        started = time.perf_counter()
        scores[name] = [scorer(model, tokenizer, c, e["choices"]) for c, e in zip(contexts, examples)]
        timings[name] = time.perf_counter() - started
    largest = max(abs(a - b) for x, y in zip(*scores.values()) for a, b in zip(x, y))
    report = {
        "model": args.model, "task": args.task, "questions": len(examples), "seconds": timings,
        "speedup": timings["one_pass_per_option"] / timings["shared_prefix_cache"],
        "largest_score_difference_nats": largest, "torch_threads": torch.get_num_threads(),
    }
    write_json_atomic(Path(args.output_dir) / "bench_ablation.json", report)
    print(report)


if __name__ == "__main__":
    main()
