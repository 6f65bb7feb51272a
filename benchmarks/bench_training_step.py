#!/usr/bin/env python
"""One training step (forward + backward) under each attention option and each loss, in one process.

    python benchmarks/bench_training_step.py --mode attention --model_name_or_path offline:smollm2-135m \\
        --block_size 256 --batch_size 2 --steps 5 --output_dir outputs/bench_training_step
    python benchmarks/bench_training_step.py --mode loss --model_name_or_path offline:tiny-mistral \\
        --vocab_size 122880 --block_size 1024 --batch_size 1 --output_dir outputs/bench_training_step

attention: blocks of the bundled corpus (token shards of the model's tokenizer, so document boundaries
are real) through `--model_name_or_path` with: causal attention across documents (the old default,
SDPA), and per-document attention from position ids with SDPA (transformers builds a block-diagonal
boolean mask), eager, and flex_attention (block mask, torch.compile; skips fully masked blocks).
Median step time over `--steps` after one warm-up step.

kernel: the attention op alone (forward + backward) at the model's head shape, on the document
boundaries of real blocks, the options interleaved round-robin over `--steps` rounds (drift on a
busy machine hits all alike): SDPA causal, SDPA with the block-diagonal mask, flex_attention.

    python benchmarks/bench_training_step.py --mode kernel --block_size 2048 --batch_size 2 --steps 20

loss: the model's embeddings resized to `--vocab_size` rows (a 120k vocabulary), then steps with
transformers' plain loss (B x T x V logits, fp32 upcast, log-softmax) and with toolkit.losses'
chunked loss, one chunk holding all tokens and chunks of 256 tokens. Peak memory = the process's resident set size sampled every millisecond during the step,
minus the resident set size just before it (large tensors are mmap-allocated and returned on free,
so each step's peak is its own). Writes bench_training_step_<mode>.json.

head: the LM-head loss alone at a full-size head (default the 7B's: V = 120,064, H = 4,096, bf16),
`--head_tokens` tokens, chunk `--loss_chunk_size`, forward + backward: toolkit.losses' chunked loss
against the implementation at git revision `--baseline_revision` (read with `git show`, imported
in this process), interleaved over `--steps` rounds. Peak = RSS above the start of each call
(weight, hidden states and the weight's existing gradient are allocated before).

    python benchmarks/bench_training_step.py --mode head --steps 2 --baseline_revision ac507ec
"""

import gc
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets  # noqa: E402
from toolkit.losses import use_fused_loss  # noqa: E402
from toolkit.reports import write_json_atomic  # noqa: E402
from toolkit.token_shards import TokenBlocks, tokenize_locally  # noqa: E402
from toolkit.quiet import quiet_by_default  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = [REPO / "sample_data/pool/data/ja/ja_clean_0000.jsonl.gz", REPO / "sample_data/pool/data/en/en_clean_0000.jsonl.gz"]


@dataclass
class BenchArguments:
    mode: str = field(metadata={"help": "attention (whole steps), kernel (the attention op alone), loss or head"})
    model_name_or_path: str = field(default="offline:smollm2-135m")
    output_dir: str = field(default="outputs/bench_training_step")
    block_size: int = field(default=256)
    batch_size: int = field(default=2)
    steps: int = field(default=5)
    vocab_size: int = field(default=122880, metadata={"help": "loss: embedding rows (a 120k vocabulary)."})
    attention: str = field(default="cross_document_sdpa,sdpa,eager,flex_attention")
    head_vocab_size: int = field(default=120064, metadata={"help": "head: rows of the LM head."})
    head_hidden_size: int = field(default=4096, metadata={"help": "head: hidden size."})
    head_tokens: int = field(default=2048, metadata={"help": "head: tokens through the head per call."})
    loss_chunk_size: int = field(default=1024)
    head_dtype: str = field(default="bfloat16", metadata={"help": "head: dtype of the weight and hidden states."})
    baseline_revision: str = field(default="ac507ec", metadata={"help": "head: git revision of the old losses.py."})


class PeakRSS:
    """Peak resident set size above the starting one, sampled every millisecond in a thread."""

    def __enter__(self):
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.above_start = self.peak - self.start


def step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss)


def bench_attention(args, output_dir):
    shards = output_dir / f"tokens-{Path(assets.resolve(args.model_name_or_path)).name}"
    if not (shards / "token_shards.json").exists():
        tokenize_locally(CORPUS, args.model_name_or_path, shards)
    per_document = TokenBlocks(shards, args.block_size, per_document=True)
    generator = torch.Generator().manual_seed(0)
    picks = torch.randperm(len(per_document), generator=generator)[: args.batch_size * (args.steps + 1)].tolist()
    batches = [{k: torch.stack([per_document[i][k] for i in picks[s * args.batch_size:(s + 1) * args.batch_size]])
                for k in ("input_ids", "labels", "position_ids")} for s in range(args.steps + 1)]
    documents_per_block = statistics.mean(int((b["position_ids"] == 0).sum()) / args.batch_size for b in batches)
    rows = []
    for option in args.attention.split(","):
        implementation = "sdpa" if option == "cross_document_sdpa" else option
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(assets.resolve(args.model_name_or_path), dtype=torch.float32,
                                                     attn_implementation=implementation)
        model.config.use_cache = False
        model.train()
        times, losses = [], []
        try:
            for index, batch in enumerate(batches):
                if option == "cross_document_sdpa":
                    batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
                started = time.perf_counter()
                losses.append(step(model, batch))
                if index:  # the first step warms up (and compiles flex_attention)
                    times.append(time.perf_counter() - started)
            rows.append({"attention": option, "per_document": option != "cross_document_sdpa",
                         "median_step_seconds": statistics.median(times),
                         "mean_loss": statistics.mean(losses)})
        except Exception as error:  # an option this machine cannot run is reported, not hidden
            rows.append({"attention": option, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        del model
        gc.collect()
    baseline = next((r for r in rows if r["attention"] == "cross_document_sdpa" and "error" not in r), None)
    for row in rows:
        if baseline and "error" not in row:
            row["time_vs_cross_document_sdpa"] = row["median_step_seconds"] / baseline["median_step_seconds"]
    return {"documents_per_block": documents_per_block, "rows": rows}


def bench_kernel(args, output_dir):
    """The attention op alone (forward + backward), options interleaved round-robin so that a busy
    machine's drift hits every option alike; document boundaries from real blocks."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    config = AutoModelForCausalLM.from_pretrained(assets.resolve(args.model_name_or_path)).config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    shards = output_dir / f"tokens-{Path(assets.resolve(args.model_name_or_path)).name}"
    if not (shards / "token_shards.json").exists():
        tokenize_locally(CORPUS, args.model_name_or_path, shards)
    blocks = TokenBlocks(shards, args.block_size, per_document=True)
    picks = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[: args.batch_size].tolist()
    positions = torch.stack([blocks[i]["position_ids"] for i in picks])
    documents = (positions == 0).cumsum(-1)  # the document index of each token
    q, k, v = (torch.randn(args.batch_size, heads, args.block_size, head_dim, requires_grad=True) for _ in range(3))
    causal = torch.ones(args.block_size, args.block_size, dtype=torch.bool).tril()
    dense_mask = (documents[:, None, :, None] == documents[:, None, None, :]) & causal

    def same_document(b, h, q_idx, kv_idx):
        return (documents[b, q_idx] == documents[b, kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(same_document, args.batch_size, None, args.block_size, args.block_size,
                                   device="cpu")
    compiled_flex = torch.compile(flex_attention)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    options = {
        "sdpa causal (crosses documents)": lambda: sdpa(q, k, v, is_causal=True),
        "sdpa + block-diagonal bool mask": lambda: sdpa(q, k, v, attn_mask=dense_mask),
        "flex_attention + block mask (compiled)": lambda: compiled_flex(q, k, v, block_mask=block_mask),
    }
    notes = {}
    try:
        options["flex_attention + block mask (compiled)"]().sum().backward()
    except Exception as error:  # torch 2.13: "FlexAttention does not support backward on CPU"
        notes["flex_attention + block mask (compiled)"] = f"{type(error).__name__}: {str(error)[:200]}"
        del options["flex_attention + block mask (compiled)"]
    times = {name: [] for name in options}
    for repeat in range(args.steps + 1):
        for name, attend in options.items():
            started = time.perf_counter()
            attend().sum().backward()
            if repeat:  # the first round compiles and warms up
                times[name].append(time.perf_counter() - started)
            q.grad = k.grad = v.grad = None
    baseline = statistics.median(times["sdpa causal (crosses documents)"])
    rows = [{"attention": name, "median_ms": statistics.median(t) * 1e3, "vs_sdpa_causal": statistics.median(t) / baseline}
            for name, t in times.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    print(json.dumps(notes), flush=True)
    return {"heads": heads, "head_dim": head_dim, "documents_per_block": float(documents[:, -1].float().mean() + 1),
            "rows": rows, "not_runnable": notes}


def bench_loss(args, output_dir):
    rows = []
    for implementation, chunk_size in (("plain", None), ("chunked", args.block_size * args.batch_size),
                                       ("chunked", 256)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(assets.resolve(args.model_name_or_path), dtype=torch.float32)
        model.resize_token_embeddings(args.vocab_size, mean_resizing=False)
        model.config.use_cache = False
        use_fused_loss(model, implementation, chunk_size=chunk_size)
        ids = torch.randint(3, args.vocab_size, (args.batch_size, args.block_size),
                            generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids}
        step(model, batch)  # warm-up: allocator, gradients' first allocation
        gc.collect()
        times, peaks = [], []
        for _ in range(args.steps):
            with PeakRSS() as memory:
                started = time.perf_counter()
                loss = step(model, batch)
                times.append(time.perf_counter() - started)
            peaks.append(memory.above_start)
            gc.collect()
        rows.append({"loss": implementation, "chunk_size": chunk_size, "vocab_size": args.vocab_size, "tokens": ids.numel(),
                     "peak_rss_above_start_mib": max(peaks) / 2**20, "median_step_seconds": statistics.median(times),
                     "loss_value": loss})
        print(json.dumps(rows[-1]), flush=True)
        del model
        gc.collect()
    for row in rows[1:]:
        row["peak_vs_plain"] = row["peak_rss_above_start_mib"] / rows[0]["peak_rss_above_start_mib"]
        row["time_vs_plain"] = row["median_step_seconds"] / rows[0]["median_step_seconds"]
    return {"rows": rows}


def _losses_at(revision):
    """toolkit/losses.py as it was at `revision`, imported as a separate module (the baseline)."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{revision}:scripts/toolkit/losses.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"losses_{revision}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_head(args, output_dir):
    from toolkit import losses

    implementations = {f"chunked at {args.baseline_revision} (before)": _losses_at(args.baseline_revision),
                       "chunked (now)": losses}
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.head_dtype)
    weight = (torch.randn(args.head_vocab_size, args.head_hidden_size, generator=generator) * 0.02).to(dtype)
    weight.requires_grad_(True)
    hidden = torch.randn(1, args.head_tokens, args.head_hidden_size, generator=generator).to(dtype)
    hidden.requires_grad_(True)
    labels = torch.randint(0, args.head_vocab_size, (1, args.head_tokens), generator=generator)
    weight.grad = torch.zeros_like(weight)  # a model's gradient exists already from the previous step
    results = {name: {"peaks": [], "times": []} for name in implementations}
    gradients = {}
    for repeat in range(args.steps):
        for name, module in implementations.items():
            weight.grad.zero_()
            hidden.grad = None
            gc.collect()
            with PeakRSS() as memory:
                started = time.perf_counter()
                loss = module.chunked_linear_cross_entropy(hidden, weight, labels, args.loss_chunk_size)
                loss.backward()
                seconds = time.perf_counter() - started
            results[name]["peaks"].append(memory.above_start)
            results[name]["times"].append(seconds)
            results[name]["loss"] = float(loss.detach())
            gradients[name] = weight.grad.float().clone() if repeat == 0 else gradients[name]
            print(json.dumps({"round": repeat, "implementation": name, "peak_gib": memory.above_start / 2**30,
                              "seconds": seconds}), flush=True)
    before, now = list(gradients.values())
    rows = [{"implementation": name, "peak_rss_above_start_gib": max(r["peaks"]) / 2**30,
             "median_seconds": statistics.median(r["times"]), "loss_value": r["loss"]} for name, r in results.items()]
    for row in rows:
        row["peak_vs_before"] = row["peak_rss_above_start_gib"] / rows[0]["peak_rss_above_start_gib"]
        row["time_vs_before"] = row["median_seconds"] / rows[0]["median_seconds"]
    return {"vocab_size": args.head_vocab_size, "hidden_size": args.head_hidden_size, "tokens": args.head_tokens,
            "chunk_size": args.loss_chunk_size, "dtype": args.head_dtype, "rows": rows,
            "head_gradient_relative_difference": float((before - now).norm() / before.norm())}


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    modes = {"attention": bench_attention, "kernel": bench_kernel, "loss": bench_loss, "head": bench_head}
    result = modes[args.mode](args, output_dir)
    result = {"arguments": vars(args), "torch_threads": torch.get_num_threads(), **result}
    write_json_atomic(output_dir / f"bench_training_step_{args.mode}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
