#!/usr/bin/env python
"""New-token embedding inits: held-out bits/char at step 0, their cost, and the recovery curve.

    # step 0: every --embedding_init on the tied and the untied SmolLM2, one process, one run
    python benchmarks/bench_embedding_init.py --part step0 --tokenizer_name outputs/demo/tokenizer \\
        --train_token_dir outputs/demo/mix/tokens --output_dir outputs/bench_embedding_init
    # where the step-0 excess goes: held-out JA by predicted and last-read token kind, new-row mass
    python benchmarks/bench_embedding_init.py --part excess --models offline:smollm2-135m-untied \\
        --inits subword_mean offset_fit --tokenizer_name outputs/demo/tokenizer \\
        --train_token_dir outputs/demo/mix/tokens --max_eval_documents 2 --max_eval_characters 1500 \\
        --output_dir outputs/bench_embedding_init
    # the curve: held-out JA bits/char against characters seen, continued pretraining from the old
    # default (subword_mean, the new rows at the embedding learning rate), the new default (offset_fit,
    # the new rows at 4x) and the raw base with its own tokenizer (arm 2)
    python benchmarks/bench_embedding_init.py --part curve --tokenizer_name outputs/demo/tokenizer \\
        --train_token_dir outputs/demo/mix/tokens --base_token_dir outputs/demo/mix/tokens-base \\
        --output_dir outputs/bench_embedding_init

step0: the base model with its own tokenizer, then the extended model under each init (the init is
timed: seconds of `extend_embeddings`, one process), on the first `--max_eval_documents` held-out
JA and EN documents with a `--max_length` sliding window (pretrain.py's evaluation). The ratio
extended / base is the figure of issue 17 (<= 1.10 wanted for JA, EN within 1%).

The init's cost at 7B: FLOPs counted from the init's own work (the base model's forward over the
contexts' base pieces, `steps` x (forward + activation backward) through `target_layer` layers over
the contexts, `steps` x the output fit's matmuls), turned into GPU-hours at a stated MFU and peak,
next to the reference run's 2,400 GPU-hours.

curve: pretrain.py itself, one process each (no accelerate: the same loop, cheaper on a shared
CPU), all arms at once so that a stopped run leaves a comparable partial curve; evaluation every
`--curve_eval_characters` characters on `--curve_eval_documents` JA documents. `--part plot`
draws whatever the arms have logged so far (embedding_init_curve.png).
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from toolkit import assets  # noqa: E402
from toolkit.corpus import read_texts  # noqa: E402
from toolkit.embeddings import DATA_INITS, INITS, FitSettings, extend_embeddings, mine_contexts  # noqa: E402
from toolkit.metrics import bits_per_character  # noqa: E402
from toolkit.quiet import quiet_by_default  # noqa: E402
from toolkit.reports import write_json_atomic  # noqa: E402
from toolkit.token_shards import read_manifest  # noqa: E402

REFERENCE_GPU_HOURS = 2400  # the reference recipe's continued pretraining (README)


@dataclass
class BenchArguments:
    tokenizer_name: str = field(metadata={"help": "The extended tokenizer (the demo's outputs/demo/tokenizer)."})
    train_token_dir: str = field(metadata={"help": "Its token shards (contexts of the data-aware inits)."})
    output_dir: str = field(metadata={"help": "Where the JSON results and the PNG go."})
    part: str = field(default="step0", metadata={"help": "step0, excess, curve or plot."})
    models: list[str] = field(default_factory=lambda: ["offline:smollm2-135m", "offline:smollm2-135m-untied"])
    inits: list[str] = field(default_factory=lambda: list(INITS))
    eval_files_ja: str = field(default="sample_data/eval/ja_eval.jsonl.gz")
    eval_files_en: str = field(default="sample_data/eval/en_eval.jsonl.gz")
    max_eval_documents: int = field(default=4)
    max_eval_characters: int = field(default=None, metadata={"help": "Keep the first N characters of each document."})
    max_length: int = field(default=256)
    context_tokens: int = field(default=8192, metadata={"help": "pretrain.py --embedding_init_context_tokens."})
    steps: int = field(default=FitSettings.steps)
    target_layer: int = field(default=FitSettings.target_layer)
    learning_rate: float = field(default=FitSettings.learning_rate)
    seed: int = field(default=42)
    # the 7B estimate
    new_tokens_7b: int = field(default=88000, metadata={"help": "New tokens of the reference run (32k -> ~120k)."})
    context_tokens_7b: int = field(default=4_000_000, metadata={"help": "Context tokens the init reads at 7B."})
    mfu_7b: float = field(default=0.4)
    peak_flops_7b: float = field(default=989e12, metadata={"help": "H100 SXM dense bf16."})
    # the curve
    base_token_dir: str = field(default=None, metadata={"help": "Token shards of the raw base tokenizer (arm 2)."})
    curve_model: str = field(default="offline:smollm2-135m")
    curve_extended_arms: list[str] = field(
        default_factory=lambda: ["subword_mean:1", "offset_fit:4"],
        metadata={"help": "INIT:MULTIPLIER per extended arm (pretrain.py's --embedding_init and "
                  "--new_embeddings_lr_multiplier). Default: the old default (subword_mean, the new rows at the "
                  "embedding learning rate) and the new one (offset_fit, 4x)."})
    curve_characters: int = field(default=200_000)
    curve_eval_characters: int = field(default=50_000)
    curve_eval_documents: int = field(default=2)
    curve_block_size: int = field(default=256)
    curve_batch_size: int = field(default=2)


def held_out(path, count, characters=None):
    texts, _ = read_texts([path])
    return [t[:characters] for t in texts if t.strip()][:count]


def init_flops_7b(args, base_to_extended_pieces):
    """FLOPs of the distill init on Mistral-7B (config numbers written here: no download)."""
    layers, hidden, vocabulary, parameters = 32, 4096, 32000, 7.24e9
    layer_parameters = (parameters - 2 * vocabulary * hidden) / layers
    context = args.context_tokens_7b
    teacher = 2 * parameters * context * base_to_extended_pieces  # forward over the base pieces, once
    student = args.steps * 3 * 2 * layer_parameters * args.target_layer * context  # fwd + activation bwd
    fit = hidden * context * 2 * (vocabulary + 3 * args.steps * args.new_tokens_7b)
    total = teacher + student + fit
    return {"flops": total, "teacher_flops": teacher, "student_flops": student, "output_fit_flops": fit,
            "gpu_hours": total / (args.mfu_7b * args.peak_flops_7b) / 3600,
            "assumptions": f"Mistral-7B, {args.context_tokens_7b:,} context tokens, {args.new_tokens_7b:,} new tokens, "
                           f"{args.steps} steps, target layer {args.target_layer}, {args.mfu_7b:.0%} MFU of "
                           f"{args.peak_flops_7b / 1e12:.0f} TFLOP/s",
            "reference_run_gpu_hours": REFERENCE_GPU_HOURS}


def offset_fit_cost_7b(args, offset_context_tokens=65_536, iterations=200):
    """FLOPs and peak memory of offset_fit (the default) on Mistral-7B: one forward of the extended
    model over the contexts, the base rows' log-sum-exp, the [positions x new tokens] logits once,
    then `iterations` L-BFGS evaluations over that matrix (about 10 FLOPs per element each)."""
    layers, hidden, vocabulary, parameters = 32, 4096, 32000, 7.24e9
    positions = offset_context_tokens
    forward = 2 * parameters * positions
    base_lse = 2 * positions * vocabulary * hidden
    new_logits = 2 * positions * args.new_tokens_7b * hidden
    lbfgs = iterations * 10 * positions * args.new_tokens_7b
    total = forward + base_lse + new_logits + lbfgs
    return {"flops": total, "forward_flops": forward, "base_lse_flops": base_lse, "new_logit_flops": new_logits,
            "lbfgs_flops": lbfgs, "gpu_hours": total / (args.mfu_7b * args.peak_flops_7b) / 3600,
            # fp32 [positions, new tokens] logits, plus the same again for L-BFGS's gradient: the limit
            "logit_matrix_gib": 2 * 4 * positions * args.new_tokens_7b / 2**30,
            "assumptions": f"Mistral-7B ({layers} layers, hidden {hidden}), {positions:,} context positions, "
                           f"{args.new_tokens_7b:,} new tokens, {iterations} L-BFGS evaluations, {args.mfu_7b:.0%} MFU "
                           f"of {args.peak_flops_7b / 1e12:.0f} TFLOP/s; every process runs the same fit",
            "reference_run_gpu_hours": REFERENCE_GPU_HOURS}


def step0(args):
    torch.manual_seed(args.seed)
    texts = {"ja": held_out(args.eval_files_ja, args.max_eval_documents, args.max_eval_characters),
             "en": held_out(args.eval_files_en, args.max_eval_documents, args.max_eval_characters)}
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve(args.tokenizer_name))
    contexts = mine_contexts(args.train_token_dir, max_tokens=args.context_tokens, seed=args.seed)
    settings = FitSettings(steps=args.steps, target_layer=args.target_layer, learning_rate=args.learning_rate)
    rows, out = [], Path(args.output_dir)

    def measure(model, model_tokenizer):
        with torch.no_grad():
            return {language: bits_per_character(model.eval(), model_tokenizer, documents,
                                                 max_length=args.max_length).bits_per_character
                    for language, documents in texts.items()}

    for name in args.models:
        path = assets.resolve(name)
        base_tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        base = measure(model, base_tokenizer)
        rows.append({"model": name, "init": "base (own tokenizer)", "init_seconds": 0.0, **base})
        print(json.dumps(rows[-1]), flush=True)
        for init in args.inits:
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            started_cpu, started = time.process_time(), time.time()
            report = extend_embeddings(model, tokenizer, base_tokenizer, init=init, fit=settings,
                                       contexts=contexts if init in DATA_INITS else None)
            seconds, cpu_seconds = time.time() - started, time.process_time() - started_cpu
            figures = measure(model, tokenizer)
            rows.append({"model": name, "init": init, "init_seconds": seconds, "init_cpu_seconds": cpu_seconds,
                         **figures, "ja_ratio_to_base": figures["ja"] / base["ja"],
                         "en_ratio_to_base": figures["en"] / base["en"], "fit": report["fit"]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "fit"}), flush=True)
            write_json_atomic(out / "step0.json", {"arguments": asdict(args), "rows": rows})
    fit = next((r["fit"] for r in rows if r["init"] == "distill" and r.get("fit")), None)
    pieces = fit["base_tokens_in_contexts"] / fit["context_tokens"] if fit else 2.0
    write_json_atomic(out / "step0.json", {"arguments": asdict(args), "rows": rows,
                                           "distill_cost_at_7b": init_flops_7b(args, pieces),
                                           "offset_fit_cost_at_7b": offset_fit_cost_7b(args),
                                           "torch_threads": torch.get_num_threads()})
    print(f"{'model':<30} {'init':<22} {'JA':>7} {'EN':>7} {'JA/base':>8} {'EN/base':>8} {'seconds':>8}")
    for row in rows:
        print(f"{row['model']:<30} {row['init']:<22} {row['ja']:7.3f} {row['en']:7.3f} "
              f"{row.get('ja_ratio_to_base', 1):8.3f} {row.get('en_ratio_to_base', 1):8.3f} {row['init_seconds']:8.1f}")


def excess(args):
    """Where the extended model's step-0 excess goes, per init: held-out JA split by what is predicted
    (a new token or a base token) and by what was read last, and the share of every prediction's
    probability that the new rows take ("new-row mass"). Base rows are fixed (bit-identical), so
    the base tokens' odds among themselves are the base model's; whatever mass the new rows hold where
    the text continues with a base token is lost there, log(1 + Z_new / Z_base) nats per position.
    Windows of `--max_length` tokens, not overlapping (a cruder context than step0's sliding window)."""
    import math

    texts = held_out(args.eval_files_ja, args.max_eval_documents, args.max_eval_characters)
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve(args.tokenizer_name))
    contexts = mine_contexts(args.train_token_dir, max_tokens=args.context_tokens, seed=args.seed)

    def positions(model, model_tokenizer):
        """(negative log-likelihood, logits, target, previous token) per position, all windows."""
        for text in texts:
            ids = model_tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - 1, args.max_length - 1):
                window = torch.tensor([ids[start:start + args.max_length]])
                if window.shape[1] < 2:
                    break
                with torch.no_grad():
                    logits = model(window).logits[0, :-1].float()
                target = window[0, 1:]
                yield -torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0], logits, target, window[0, :-1]

    def scored_characters(model_tokenizer):
        return sum(len(t) - len(model_tokenizer.decode(model_tokenizer(t, add_special_tokens=False)["input_ids"][:1]))
                   for t in texts)

    rows = []
    for name in args.models:
        path = assets.resolve(name)
        base_tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        base_nats = sum(float(nll.sum()) for nll, *_ in positions(model, base_tokenizer))
        base_bits = base_nats / math.log(2) / scored_characters(base_tokenizer)
        for init in args.inits:
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            extend_embeddings(model, tokenizer, base_tokenizer, init=init,
                              contexts=contexts if init in DATA_INITS else None,
                              fit=FitSettings(steps=args.steps, target_layer=args.target_layer,
                                              learning_rate=args.learning_rate))
            model.eval()
            first_new = len(base_tokenizer)
            sums = dict.fromkeys(("new_target", "base_target", "after_new", "after_base", "new_mass_lost_at_base_targets",
                                  "new_mass_all"), 0.0)
            counts = dict.fromkeys(("new_target", "base_target", "after_new", "after_base"), 0)
            for nll, logits, target, previous in positions(model, tokenizer):
                new, after_new = target >= first_new, previous >= first_new
                lost = torch.nn.functional.softplus(torch.logsumexp(logits[:, first_new:len(tokenizer)], -1)
                                                    - torch.logsumexp(logits[:, :first_new], -1))
                for key, mask in (("new_target", new), ("base_target", ~new), ("after_new", after_new),
                                  ("after_base", ~after_new)):
                    sums[key] += float(nll[mask].sum())
                    counts[key] += int(mask.sum())
                sums["new_mass_lost_at_base_targets"] += float(lost[~new].sum())
                sums["new_mass_all"] += float((1 - torch.exp(-lost)).sum())
            characters = scored_characters(tokenizer)
            bits = {key: value / math.log(2) / characters for key, value in sums.items() if key != "new_mass_all"}
            total = bits["new_target"] + bits["base_target"]
            rows.append({"model": name, "init": init, "base_bits_per_character": base_bits,
                         "bits_per_character": total, "ratio_to_base": total / base_bits,
                         "bits_per_character_by_part": bits, "positions": counts,
                         "mean_new_row_mass": sums["new_mass_all"] / (counts["new_target"] + counts["base_target"]),
                         "share_of_targets_new": counts["new_target"] / (counts["new_target"] + counts["base_target"])})
            print(json.dumps(rows[-1]), flush=True)
            write_json_atomic(Path(args.output_dir) / "excess.json", {"arguments": asdict(args), "rows": rows})


def curve_arms(args):
    """name -> (pretrain.py arguments, token dir) of each arm of the curve."""
    arms = {}
    for arm in args.curve_extended_arms:
        init, _, multiplier = arm.partition(":")
        if init not in INITS or not multiplier:
            raise SystemExit(f"--curve_extended_arms: {arm!r} is not INIT:MULTIPLIER with INIT one of {', '.join(INITS)}")
        arms[f"extended, {init}, new rows' LR x{multiplier}"] = (
            ["--tokenizer_name", args.tokenizer_name, "--embedding_init", init, "--train_token_dir",
             args.train_token_dir, "--new_embeddings_lr_multiplier", multiplier], args.train_token_dir)
    if args.base_token_dir:
        arms["continued (raw tokenizer)"] = (["--tokenizer_name", args.curve_model,
                                              "--train_token_dir", args.base_token_dir], args.base_token_dir)
    return arms


def arm_folder(args, name):
    return Path(args.output_dir) / "curve" / "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def curve(args):
    processes = []
    for name, (arm_args, token_dir) in curve_arms(args).items():
        manifest = read_manifest(token_dir)
        characters_per_step = args.curve_batch_size * args.curve_block_size * manifest["characters"] / manifest["tokens"]
        eval_steps = max(1, round(args.curve_eval_characters / characters_per_step))
        folder = arm_folder(args, name)
        command = [sys.executable, "scripts/pretrain.py", "--model_name_or_path", args.curve_model, *arm_args,
                   "--eval_files_ja", args.eval_files_ja, "--max_eval_documents", str(args.curve_eval_documents),
                   "--block_size", str(args.curve_block_size),
                   "--per_device_train_batch_size", str(args.curve_batch_size),
                   "--max_train_characters", str(args.curve_characters), "--eval_steps", str(eval_steps),
                   "--report_to", "none", "--seed", str(args.seed), "--output_dir", str(folder)]
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "log.txt", "w")
        print(f"{name}: {' '.join(command)}", flush=True)
        processes.append(subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}))
    for process in processes:
        process.wait()
    plot(args)


def plot(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolkit.training import read_metrics

    curves = {}
    for name, (_, token_dir) in curve_arms(args).items():
        manifest = read_manifest(token_dir)
        characters_per_step = args.curve_batch_size * args.curve_block_size * manifest["characters"] / manifest["tokens"]
        points = [(r["step"] * characters_per_step, r["eval_ja_bits_per_character"])
                  for r in read_metrics(arm_folder(args, name)) if "eval_ja_bits_per_character" in r]
        curves[name] = points
    base = None
    step0_file = Path(args.output_dir) / "step0.json"
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            axis.plot(*zip(*points), marker="o", label=name)
        if name.startswith("continued") and points and points[0][0] == 0:
            base = points[0][1]  # the raw base at step 0 is the base model
    if base is not None:
        axis.axhline(base, color="grey", linestyle="--", label="base model (no training)")
    axis.set_xlabel("corpus characters seen")
    axis.set_ylabel(f"held-out JA bits/char ({args.curve_eval_documents} documents)")
    axis.set_title("SmolLM2-135M continued pretraining: new-token init")
    axis.legend()
    figure.tight_layout()
    path = Path(args.output_dir) / "embedding_init_curve.png"
    figure.savefig(path, dpi=100)
    write_json_atomic(Path(args.output_dir) / "curve.json", {"arguments": asdict(args), "curves": curves,
                                                            "base_model": base,
                                                            "step0": str(step0_file) if step0_file.exists() else None})
    print(json.dumps(curves, indent=1))
    print(f"plot: {path}")


def main():
    quiet_by_default()
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    {"step0": step0, "excess": excess, "curve": curve, "plot": plot}[args.part](args)


if __name__ == "__main__":
    main()
