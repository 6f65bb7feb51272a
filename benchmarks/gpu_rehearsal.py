#!/usr/bin/env python
"""The first GPU run, rehearsed on one GPU in one command, within a time budget (default 9 minutes).

    python benchmarks/gpu_rehearsal.py --output_dir outputs/gpu_rehearsal          # one H200
    python benchmarks/gpu_rehearsal.py --smoke --output_dir outputs/gpu_rehearsal  # CPU, tiny-mistral, < 2 min

(a) throughput: tokens/s and MFU at the Mistral-7B layer shape (hidden 4096, 32 heads, 8 KV heads,
    intermediate 14336) with the ~120k vocabulary (120,064 rows), bf16, block 4096, `--layers` decoder
    layers (8 by default: 3.7B parameters, ~30 GB of weights, gradients and AdamW states, so every
    option fits one H200 without offload), per-document blocks (a document every ~`--document_tokens`
    tokens). Every attention kernel that imports (sdpa, flex_attention, flash_attention_2 when the
    flash_attn wheel exists) x loss (plain, chunked, Liger when liger_kernel imports) x gradient
    checkpointing off/on, in one process, **interleaved**: each round runs every option for
    `--steps` optimizer steps (the first round warms up and compiles, untimed), so drift hits all
    alike. The same code as pretrain.py: toolkit.packing's collate (flash gets explicit boundaries),
    the probe's per-document check, toolkit.losses, the PaLM FLOP count and the device peak of
    toolkit.training. An option that runs out of memory is recorded and dropped.
(b) the three-arm ablation in miniature, at a budget where new rows learn: SmolLM2-135M (base), the
    same model continued-pretrained with its own tokenizer, and with a tokenizer extended on the same
    Japanese text (subword-mean init of the new rows), on the same `--ablation_characters` (20M by
    default; the bundled pool is read repeatedly when it holds fewer: the report counts the passes),
    held-out Japanese bits per character every `--ablation_eval_every` steps (the curve).

Time budget: (a) gets `--throughput_share` of `--time_budget_seconds`, (b) the rest; a part that would
overrun stops early and says so in the report (rounds run, steps run, "trimmed"), never runs over.
Writes gpu_rehearsal.json and gpu_rehearsal.md (rows for BENCHMARKS.md) in --output_dir.

Wheels the device image lacks (it has torch, transformers, accelerate): benchmarks/gpu_rehearsal_wheels.sh
downloads them here, into .device_wheels/ (git-ignored), to carry.
"""

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets, packing, training  # noqa: E402
from toolkit.losses import use_fused_loss  # noqa: E402
from toolkit.quiet import quiet_by_default  # noqa: E402
from toolkit.reports import write_json_atomic  # noqa: E402
from toolkit.token_shards import IGNORE_INDEX, document_positions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JA_POOL = REPO / "sample_data/pool/data/ja/ja_clean_0000.jsonl.gz"
JA_EVAL = REPO / "sample_data/eval/ja_eval.jsonl.gz"


@dataclass
class RehearsalArguments:
    output_dir: str = field(default="outputs/gpu_rehearsal")
    smoke: bool = field(default=False, metadata={"help": "CPU, tiny-mistral, tiny sizes: the same code in < 2 min."})
    time_budget_seconds: float = field(default=540.0, metadata={"help": "The whole rehearsal (9 minutes)."})
    throughput_share: float = field(default=0.45, metadata={"help": "Share of the budget for part (a)."})
    layers: int = field(default=8, metadata={"help": "(a) decoder layers at the Mistral-7B shape."})
    vocab_size: int = field(default=120064)
    block_size: int = field(default=4096)
    micro_batch: int = field(default=1)
    document_tokens: int = field(default=1500, metadata={"help": "(a) mean document length in the synthetic blocks."})
    steps: int = field(default=3, metadata={"help": "(a) timed optimizer steps per option per round."})
    rounds: int = field(default=3, metadata={"help": "(a) interleaved rounds (the first warms up)."})
    ablation_model: str = field(default="offline:smollm2-135m")
    ablation_characters: int = field(default=20_000_000)
    ablation_block_size: int = field(default=1024)
    ablation_batch: int = field(default=16)
    ablation_learning_rate: float = field(default=3e-4)
    ablation_vocab_size: int = field(default=57344, metadata={"help": "(b) the extended tokenizer's size "
                                     "(SmolLM2: 49,152 + 8,192 Japanese pieces)."})
    ablation_tokenizer_characters: int = field(default=None, metadata={"help": "(b) characters the extension "
                                               "trains on (default: the whole pool)."})
    ablation_pool_documents: int = field(default=None, metadata={"help": "(b) first N pool documents (default: all)."})
    ablation_eval_every: int = field(default=50)
    ablation_eval_documents: int = field(default=32)
    ablation_eval_characters: int = field(default=None, metadata={"help": "(b) first N characters of each eval "
                                          "document (default: all)."})


# --------------------------------------------------------------------------- (a) throughput


def layer_shape_config(args):
    if args.smoke:
        config = AutoConfig.from_pretrained(assets.resolve("offline:tiny-mistral"))
        config.vocab_size = args.vocab_size
        return config
    return AutoConfig.for_model("mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                num_key_value_heads=8, num_hidden_layers=args.layers, vocab_size=args.vocab_size,
                                max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False)


def synthetic_blocks(args, count, generator):
    """Per-document blocks as TokenBlocks gives them: EOS (id 2) ends a document every ~document_tokens."""
    examples = []
    for _ in range(count):
        ids = torch.randint(3, args.vocab_size, (args.block_size,), generator=generator)
        ends = torch.randint(args.document_tokens // 2, args.document_tokens * 3 // 2,
                             (args.block_size // max(args.document_tokens // 2, 1) + 1,), generator=generator).cumsum(0)
        ids[ends[ends < args.block_size]] = 2
        positions = torch.from_numpy(document_positions(ids.numpy(), 2))
        labels = ids.clone()
        labels[positions == 0] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return examples


def available_attention(on_gpu):
    import importlib.util

    options = ["sdpa"]
    if on_gpu:
        options.append("flex_attention")
        if importlib.util.find_spec("flash_attn"):
            options.append("flash_attention_2")
    return options


def available_losses(on_gpu):
    import importlib.util

    return ["plain", "chunked"] + (["liger"] if on_gpu and importlib.util.find_spec("liger_kernel") else [])


def set_option(model, attention, loss, checkpointing):
    model.set_attn_implementation(attention)
    model.__dict__.pop("forward", None)  # back to the class's forward, then the option's loss
    if loss != "plain":
        use_fused_loss(model, loss, chunk_size=1024)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def throughput(args, device, deadline):
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = layer_shape_config(args)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)
    flops_per_token = training.model_flops_per_token(config, args.block_size, parameters)
    peak, peak_source = training.device_peak_flops(training.LoopArguments(), None if not on_gpu else
                                                   torch.cuda.get_device_name())
    options = [(a, l, c) for a in available_attention(on_gpu) for l in available_losses(on_gpu) for c in (False, True)]
    generator = torch.Generator().manual_seed(0)
    times = {option: [] for option in options}
    notes, probes = {}, {}
    rounds_run = 0
    for round_index in range(args.rounds):
        if time.time() > deadline:
            notes["trimmed"] = f"stopped before round {round_index + 1} of {args.rounds}: the time budget"
            break
        order = options[round_index % len(options):] + options[:round_index % len(options)]
        for option in order:
            if option in notes or time.time() > deadline:
                continue
            attention, loss, checkpointing = option
            set_option(model, attention, loss, checkpointing)
            collate = packing.document_collate(attention)
            if round_index == 0:
                probe = packing.DocumentAttentionProbe(model)
            steps = 1 if round_index == 0 else args.steps
            try:
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(steps):
                    batch = collate(synthetic_blocks(args, args.micro_batch, generator))
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    started = time.perf_counter()
                    model(**batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if on_gpu:
                        torch.cuda.synchronize()
                    if round_index:
                        times[option].append(time.perf_counter() - started)
                if round_index == 0:
                    probes[option] = probe.result
                elif on_gpu:
                    notes.setdefault("peak_memory_gib", {})[" / ".join(map(str, option))] = \
                        torch.cuda.max_memory_allocated() / 2**30
            except (torch.OutOfMemoryError, RuntimeError, ValueError) as error:
                notes[option] = f"{type(error).__name__}: {str(error)[:200]}"
                optimizer.zero_grad(set_to_none=True)
                if on_gpu:
                    torch.cuda.empty_cache()
        rounds_run += 1
    tokens = args.micro_batch * args.block_size
    rows = []
    for option, measured in times.items():
        attention, loss, checkpointing = option
        row = {"attention": attention, "loss": loss, "gradient_checkpointing": checkpointing,
               "steps_timed": len(measured),
               "per_document_attention": (probes.get(option) or {}).get("per_document_attention")}
        if option in notes:
            row["error"] = notes[option]
        if measured:
            seconds = statistics.median(measured)
            row.update(median_step_seconds=seconds, tokens_per_second=tokens / seconds,
                       mfu=tokens / seconds * flops_per_token / peak if peak else None)
        rows.append(row)
    return {"layers": config.num_hidden_layers, "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
            "parameters": parameters, "dtype": str(dtype).replace("torch.", ""), "block_size": args.block_size,
            "micro_batch": args.micro_batch, "flops_per_token": flops_per_token, "peak_flops": peak,
            "peak_flops_source": peak_source, "rounds_run": rounds_run, "rounds_asked": args.rounds,
            "notes": {k if isinstance(k, str) else " / ".join(map(str, k)): v for k, v in notes.items()},
            "rows": rows}


# --------------------------------------------------------------------------- (b) ablation in miniature


def read_texts(path, limit=None):
    import gzip

    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        for line in stream:
            text = json.loads(line).get("text", "")
            if text.strip():
                texts.append(text)
            if limit and len(texts) >= limit:
                break
    return texts


def extend_tokenizer(args, base, output_dir):
    import subprocess

    folder = output_dir / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        subprocess.run([sys.executable, "scripts/extend_tokenizer.py", "--base_tokenizer", base,
                        "--train_files", str(JA_POOL), "--eval_files", str(JA_EVAL),
                        "--vocab_size", str(args.ablation_vocab_size), "--output_dir", str(folder),
                        *(["--max_train_characters", str(args.ablation_tokenizer_characters)]
                          if args.ablation_tokenizer_characters else [])],
                       cwd=REPO, check=True, capture_output=True)
    return folder


def train_arm(args, name, model_path, tokenizer, base_tokenizer, texts, eval_texts, device, deadline):
    """Continued pretraining on `texts` (repeated until ablation_characters are seen), bits/char curve."""
    from toolkit.embeddings import extend_embeddings
    from toolkit.metrics import bits_per_character

    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                                 attn_implementation="sdpa").to(device)
    if tokenizer is not base_tokenizer:
        extend_embeddings(model, tokenizer, base_tokenizer, init="subword_mean")
    model.config.use_cache = False
    ids = []
    characters = sum(len(t) for t in texts)
    for text in texts:
        ids += [tokenizer.bos_token_id or tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)[
            "input_ids"] + [tokenizer.eos_token_id]
    characters_per_token = characters / len(ids)
    block = args.ablation_block_size
    blocks = [torch.tensor(ids[i:i + block]) for i in range(0, len(ids) - block + 1, block)]
    tokens_per_step = block * args.ablation_batch
    steps = math.ceil(args.ablation_characters / (tokens_per_step * characters_per_token))
    use_fused_loss(model, "chunked")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.ablation_learning_rate, weight_decay=0.0,
                                  fused=on_gpu)
    curve = []

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            result = bits_per_character(model, tokenizer, eval_texts, max_length=block)
        curve.append({"step": step, "characters_seen": round(step * tokens_per_step * characters_per_token),
                      "ja_bits_per_character": result.bits_per_character})
        model.train()

    evaluate(0)
    generator = torch.Generator().manual_seed(0)
    step = 0
    for step in range(1, steps + 1):
        if time.time() > deadline:
            step -= 1
            break
        picks = torch.randint(0, len(blocks), (args.ablation_batch,), generator=generator).tolist()
        examples = []
        for i in picks:
            positions = torch.from_numpy(document_positions(blocks[i].numpy(), tokenizer.eos_token_id))
            labels = blocks[i].clone()
            labels[positions == 0] = IGNORE_INDEX
            examples.append({"input_ids": blocks[i], "labels": labels, "position_ids": positions})
        batch = {k: v.to(device) for k, v in packing.stack(examples).items()}
        rate = args.ablation_learning_rate * min(1.0, step / max(1, steps // 20))  # 5% warmup
        for group in optimizer.param_groups:
            group["lr"] = rate
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.ablation_eval_every == 0:
            evaluate(step)
    if not curve or curve[-1]["step"] != step:
        evaluate(step)
    return {"arm": name, "steps_planned": steps, "steps_run": step, "trimmed": step < steps,
            "tokens_per_step": tokens_per_step, "characters_per_token": characters_per_token,
            "characters_seen": round(step * tokens_per_step * characters_per_token),
            "passes_over_the_text": step * tokens_per_step / max(len(ids), 1),
            "vocabulary": len(tokenizer), "curve": curve}


def ablation(args, device, deadline, output_dir):
    started = time.time()
    try:
        model_path = assets.resolve(args.ablation_model)
    except (FileNotFoundError, ImportError, OSError) as error:  # recorded, not hidden: see README
        return {"model": args.ablation_model, "skipped": f"{type(error).__name__}: {str(error)[:300]}", "arms": []}
    base_tokenizer = AutoTokenizer.from_pretrained(model_path)
    extended = AutoTokenizer.from_pretrained(extend_tokenizer(args, model_path, output_dir))
    seconds = {"tokenizer_extension": time.time() - started}
    texts = read_texts(JA_POOL, args.ablation_pool_documents)
    eval_texts = [t[:args.ablation_eval_characters] for t in read_texts(JA_EVAL, args.ablation_eval_documents)]
    arms = []
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    from toolkit.metrics import bits_per_character

    with torch.no_grad():
        base_bits = bits_per_character(base.eval(), base_tokenizer, eval_texts,
                                       max_length=args.ablation_block_size).bits_per_character
    arms.append({"arm": "base", "steps_run": 0, "curve": [{"step": 0, "characters_seen": 0,
                                                           "ja_bits_per_character": base_bits}]})
    del base
    seconds["base_evaluation"] = time.time() - started - sum(seconds.values())
    remaining = deadline - time.time()
    for index, (name, tokenizer) in enumerate((("continued", base_tokenizer), ("extended", extended))):
        arm_deadline = time.time() + (deadline - time.time()) / (2 - index)  # an equal share each
        arm_started = time.time()
        arms.append(train_arm(args, name, model_path, tokenizer, base_tokenizer, texts, eval_texts, device,
                              arm_deadline))
        seconds[name] = time.time() - arm_started
    return {"model": args.ablation_model, "seconds": seconds, "characters_asked": args.ablation_characters,
            "pool_characters": sum(len(t) for t in texts), "seconds_available": remaining, "arms": arms}


# --------------------------------------------------------------------------- report


def markdown(report):
    lines = [f"| attention | loss | checkpointing | tokens/s | MFU | per-document |", "|---|---|---|---:|---:|---|"]
    for row in report["throughput"]["rows"]:
        shown = f"{row['tokens_per_second']:,.0f}" if row.get("tokens_per_second") else row.get("error", "not run")
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "-"
        lines.append(f"| {row['attention']} | {row['loss']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                     f"{shown} | {mfu} | {row['per_document_attention']} |")
    if report["ablation"].get("skipped"):
        return "\n".join(lines + ["", f"ablation skipped: {report['ablation']['skipped']}"]) + "\n"
    lines += ["", "| arm | steps | characters seen | passes over the text | JA bits/char at start | at end |",
              "|---|---:|---:|---:|---:|---:|"]
    for arm in report["ablation"]["arms"]:
        curve = arm["curve"]
        lines.append(f"| {arm['arm']} | {arm['steps_run']} | {arm.get('characters_seen', 0):,} | "
                     f"{arm.get('passes_over_the_text', 0):.2f} | {curve[0]['ja_bits_per_character']:.3f} | "
                     f"{curve[-1]['ja_bits_per_character']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(RehearsalArguments).parse_args_into_dataclasses()
    if args.smoke:  # the same code, CPU sizes
        args.ablation_model = "offline:tiny-mistral"
        args.vocab_size, args.block_size, args.document_tokens, args.steps, args.rounds = 4096, 128, 40, 1, 2
        args.ablation_characters, args.ablation_block_size, args.ablation_batch = 20_000, 128, 2
        args.ablation_vocab_size, args.ablation_eval_every, args.ablation_eval_documents = 32500, 10, 2
        args.ablation_tokenizer_characters, args.ablation_pool_documents = 100_000, 40
        args.ablation_eval_characters = 600
        args.time_budget_seconds, args.throughput_share = min(args.time_budget_seconds, 100), 0.3
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {"arguments": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    report["throughput"] = throughput(args, device, started + args.throughput_share * args.time_budget_seconds)
    report["throughput"]["seconds"] = time.time() - started
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report["ablation"] = ablation(args, device, started + args.time_budget_seconds, output_dir)
    report["seconds"] = time.time() - started
    write_json_atomic(output_dir / "gpu_rehearsal.json", report)
    (output_dir / "gpu_rehearsal.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    print(f"{report['seconds']:.0f} s; gpu_rehearsal.json and gpu_rehearsal.md in {output_dir}")


if __name__ == "__main__":
    main()
