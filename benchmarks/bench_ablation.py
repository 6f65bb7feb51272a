#!/usr/bin/env python
"""Measure the ablation's evaluation building blocks, each against its baseline in one process.

    python benchmarks/bench_ablation.py --model offline:smollm2-135m --task sample_data/tasks/continuation_mc.jsonl \\
        --max_examples 8 --output_dir outputs/bench_ablation

1. Multiple-choice scoring: shared-prefix KV cache vs one pass per option, on the same
   questions: seconds, the ratio, and the largest score difference (they must agree).
2. The character budget's cost: greedy generation that stops each row after
   `--budget_characters` characters (a stopping criterion that decodes the new tokens at
   every step) vs plain `generate` for the same number of new tokens.
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
from toolkit.speed import GreedyWriter
from toolkit.reports import write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class BenchArguments:
    model: str = field(default="offline:smollm2-135m")
    task: str = field(default="sample_data/tasks/continuation_mc.jsonl")
    max_examples: int = field(default=8)
    budget_characters: int = field(default=48, metadata={"help": "Characters per row for the budget measurement."})
    repeats: int = field(default=3, metadata={"help": "Timed runs of each generation way (median)."})
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


@torch.no_grad()
def character_budget_cost(model, tokenizer, prompts, args):
    """Seconds of character-budgeted generation vs plain generate of as many new tokens, one
    prompt at a time (so both ways generate exactly the same tokens)."""
    writers = [GreedyWriter(model, tokenizer, [prompt], args.budget_characters, batch_size=1) for prompt in prompts]
    writers[0]()  # warm-up

    def plain(writer, steps):
        (ids, mask), = writer.batches
        began = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False, pad_token_id=writer.pad, suppress_tokens=writer.suppressed)
        return time.perf_counter() - began

    budgeted = plain_total = tokens = 0.0
    for writer in writers:
        runs = sorted(writer() for _ in range(args.repeats))
        seconds, _, new_tokens = runs[len(runs) // 2]
        budgeted += seconds
        tokens += new_tokens
        plain_total += sorted(plain(writer, new_tokens) for _ in range(args.repeats))[args.repeats // 2]
    return {"prompts": len(prompts), "budget_characters": args.budget_characters, "new_tokens": int(tokens),
            "budgeted_seconds": budgeted, "plain_seconds_same_tokens": plain_total, "ratio": budgeted / plain_total}


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
        "character_budget": character_budget_cost(model, tokenizer, [e["prompt"] for e in examples], args),
    }
    write_json_atomic(Path(args.output_dir) / "bench_ablation.json", report)
    print(report)


if __name__ == "__main__":
    main()
