"""The training blocks that `pretrain.py` and `finetune.py` share (the shape of transformers'
`run_clm_no_trainer.py`, each block written once).

API (stable; later changes are additive only):

    LoopArguments                 dataclass of the loop's knobs, parsed with HfArgumentParser next to a
                                  script's own dataclasses (batch size, accumulation, LR, schedule,
                                  clipping, checkpointing, logging, output_dir, seed, ...)
    make_accelerator(args, project_name) -> Accelerator
                                  gloo process group when CUDA is absent (ZeRO-3 on CPU), trackers
                                  (`--report_to tensorboard|wandb|none`), DeepSpeed micro-batch,
                                  accumulation, clipping and 16-bit-gather-on-save filled in from `args`
    optimizer_param_groups(model, args) -> list[dict]
                                  no weight decay on biases and norms (any parameter with < 2 dims);
                                  input/output embeddings in their own group ("embedding": True) with
                                  `--embedding_learning_rate` (default: `--learning_rate`)
    make_optimizer(model, args) -> torch.optim.AdamW   (fused on CUDA)
    make_scheduler(optimizer, args, num_training_steps) -> LambdaLR
                                  `transformers.get_scheduler` (warmup + cosine by default); groups that are
                                  not embeddings get LR 0 for the first `--freeze_non_embedding_steps`
                                  steps (exactly frozen under AdamW, ZeRO-3 safe, no compute saved)
    TrainState                    step, epoch, batch_in_epoch, tokens_seen, ... (the data position)
    ShardedEpochSampler           deterministic per-epoch permutation (seed + epoch), split across
                                  processes, can start at a batch: exact resume without reading skipped data
    train(accelerator, model, optimizer, scheduler, dataset, collate_fn, args, state,
          evaluate=None, flops_per_token=None) -> TrainState
                                  the loop: `accelerator.accumulate`, clipping, scheduler, logging every
                                  `--logging_steps` (loss, lr, grad_norm, tokens/s, MFU) to the trackers,
                                  tqdm and `<output_dir>/metrics.jsonl`, `evaluate(step) -> dict` every
                                  `--eval_steps`, checkpoints every `--checkpointing_steps`
    save_checkpoint(accelerator, args, state) / resume(accelerator, args) -> TrainState
                                  `accelerator.save_state` into `<output_dir>/checkpoints/.tmp-step_N`, then
                                  rename to `step_N` (atomic), keep the last `--checkpoints_total_limit`;
                                  `--resume_from_checkpoint latest|PATH` restores model, optimizer,
                                  scheduler, RNG and data position ("latest" with none found: fresh start)
    save_consolidated(accelerator, model, output_dir, tokenizer=None, dtype="bfloat16", max_shard_size="5GB")
                                  full weights (ZeRO-3 gathered) as sharded safetensors + index, via
                                  `accelerator.get_state_dict` and `save_pretrained` on the main process
    model_flops_per_token(config, seq_len, num_parameters) / peak_flops_per_device(args)
    log_metrics(accelerator, output_dir, record)   trackers + metrics.jsonl + console, for records outside the loop
    read_metrics(output_dir) -> list[dict];  plot_metrics(output_dir) -> Path (loss-curve PNG)

MFU = achieved FLOP/s / (processes x peak FLOP/s of one device), with the PaLM count
(Chowdhery et al. 2022, appendix B) per trained token: 6 N + 12 L H Q T, N the parameters
that take part in matmuls (all but the input embedding, unless tied), L layers, H heads,
Q head size, T the sequence length. Activation recomputation (`--gradient_checkpointing`) does
not count: it is MFU, not hardware utilisation.
"""

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from toolkit.reports import read_json, write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "train_state.json"
METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12}


@dataclass
class LoopArguments:
    output_dir: str = field(default=None, metadata={"help": "Where the model, checkpoints, logs and report go."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (after warmup)."})
    embedding_learning_rate: float = field(
        default=None,
        metadata={"help": "Peak LR of the input/output embedding matrices (whole matrices: new rows are not "
                  "separate tensors under ZeRO-3). Default: --learning_rate."},
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (never on biases and norms)."})
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.95)
    adam_epsilon: float = field(default=1e-8)
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (global L2 norm)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Any transformers.get_scheduler name."})
    num_warmup_steps: int = field(default=None, metadata={"help": "Warmup steps (default: --warmup_ratio)."})
    warmup_ratio: float = field(default=0.01, metadata={"help": "Warmup as a share of the steps."})
    max_train_steps: int = field(default=None, metadata={"help": "Optimizer steps; overrides --num_train_epochs."})
    num_train_epochs: int = field(default=1)
    freeze_non_embedding_steps: int = field(
        default=0, metadata={"help": "For the first N steps only the embeddings learn (others get LR 0)."}
    )
    seed: int = field(default=42, metadata={"help": "Data order and initialisation."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N optimizer steps."})
    eval_steps: int = field(default=None, metadata={"help": "Evaluate every N steps (and always at the end)."})
    checkpointing_steps: int = field(default=None, metadata={"help": "Save a resumable checkpoint every N steps."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str = field(
        default=None, metadata={"help": "'latest' (in <output_dir>/checkpoints; fresh start if none) or a path."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, both comma-separated, or none."})
    peak_tflops_per_device: float = field(
        default=None, metadata={"help": "Peak TFLOP/s of one device for MFU (default: known GPUs by name)."}
    )


# --------------------------------------------------------------------------- accelerator


def make_accelerator(args: LoopArguments, project_name: str = "train"):
    """An Accelerator for `args`; DeepSpeed's batch/accumulation/clipping come from `args`."""
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    trackers = [t for t in args.report_to.split(",") if t and t != "none"]
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")),
        kwargs_handlers=handlers,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        config = plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
        config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        config["train_batch_size"] = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        )
        config["gradient_clipping"] = args.max_grad_norm
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    accelerator.project_name = project_name
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


# --------------------------------------------------------------------------- optimizer, schedule


def _embedding_parameter_ids(model):
    ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
    return ids


def optimizer_param_groups(model, args: LoopArguments):
    """Three groups: decayed matrices, biases/norms (no decay), embeddings (own LR)."""
    embedding_ids = _embedding_parameter_ids(model)
    groups = {
        "decay": {"name": "decay", "params": [], "weight_decay": args.weight_decay, "embedding": False},
        "no_decay": {"name": "no_decay", "params": [], "weight_decay": 0.0, "embedding": False},
        "embedding": {
            "name": "embedding", "params": [], "weight_decay": args.weight_decay, "embedding": True,
            "lr": args.embedding_learning_rate or args.learning_rate,
        },
    }
    seen = set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if id(parameter) in embedding_ids:
            groups["embedding"]["params"].append(parameter)
        elif parameter.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            groups["no_decay"]["params"].append(parameter)
        else:
            groups["decay"]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]


def make_optimizer(model, args: LoopArguments):
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(optimizer_param_groups(model, args), **kwargs)


def num_warmup_steps(args: LoopArguments, num_training_steps: int) -> int:
    if args.num_warmup_steps is not None:
        return args.num_warmup_steps
    return math.ceil(args.warmup_ratio * num_training_steps)


def make_scheduler(optimizer, args: LoopArguments, num_training_steps: int):
    """`transformers.get_scheduler`, plus LR 0 for non-embedding groups while frozen.

    Stepped once per optimizer step by `train` (not passed to `accelerator.prepare`, which
    would step it once per process), and saved in checkpoints via `register_for_checkpointing`.
    """
    from transformers import get_scheduler

    base = get_scheduler(
        args.lr_scheduler_type, optimizer,
        num_warmup_steps=num_warmup_steps(args, num_training_steps), num_training_steps=num_training_steps,
    )
    if not args.freeze_non_embedding_steps:
        return base
    schedule, frozen = base.lr_lambdas[0], args.freeze_non_embedding_steps

    def body(step):
        return 0.0 if step < frozen else schedule(step)

    lambdas = [schedule if group.get("embedding") else body for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


# --------------------------------------------------------------------------- data order


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    tokens_seen: int = 0  # over all processes
    train_seconds: float = 0.0  # wall time spent in the loop, over all sessions of the run
    resumed_from: str = None


class ShardedEpochSampler(Sampler):
    """Indices of one process for one epoch: permutation(seed + epoch), split round-robin by
    batch across processes (each gets the same number of full batches), from `start_batch`."""

    def __init__(self, size, batch_size, seed, epoch, rank, world_size, start_batch=0):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def batches_per_process(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_step = self.batch_size * self.world_size
        for batch in range(self.start_batch, self.batches_per_process()):
            first = batch * per_step + self.rank * self.batch_size
            yield from order[first:first + self.batch_size]

    def __len__(self):
        return (self.batches_per_process() - self.start_batch) * self.batch_size


# --------------------------------------------------------------------------- checkpoints


def checkpoint_root(args) -> Path:
    return Path(args.output_dir) / "checkpoints"


def list_checkpoints(args) -> list:
    """Complete checkpoints, oldest first (a checkpoint is complete once renamed from .tmp-)."""
    root = checkpoint_root(args)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator, args: LoopArguments, state: TrainState) -> Path:
    """All processes call this. Writes `.tmp-step_N`, then renames it to `step_N` (shared filesystem)."""
    root = checkpoint_root(args)
    final = root / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    temporary = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(temporary / STATE_FILE, asdict(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(args)[: -args.checkpoints_total_limit or None]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, args: LoopArguments) -> TrainState:
    """The state to start from: restored from `--resume_from_checkpoint`, or fresh."""
    if not args.resume_from_checkpoint:
        return TrainState()
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args)
        if not found:
            accelerator.print(f"no checkpoint in {checkpoint_root(args)}: starting from step 0")
            return TrainState()
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE}); use a step_N folder or 'latest'")
    accelerator.load_state(str(path))
    state = TrainState(**read_json(path / STATE_FILE))
    state.resumed_from = str(path)
    accelerator.print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return state


# --------------------------------------------------------------------------- FLOPs


def model_flops_per_token(config, seq_len: int, num_parameters: int) -> float:
    """PaLM count for one trained token (forward + backward): 6 N + 12 L H Q T (see module doc)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    matmul_parameters = num_parameters
    if not getattr(config, "tie_word_embeddings", False):
        matmul_parameters -= config.vocab_size * config.hidden_size  # the input embedding is a lookup
    return 6 * matmul_parameters + 12 * config.num_hidden_layers * heads * head_dim * seq_len


def peak_flops_per_device(args: LoopArguments):
    if args.peak_tflops_per_device:
        return args.peak_tflops_per_device * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
    return None  # CPU or unknown GPU: MFU is not reported


# --------------------------------------------------------------------------- the loop


def _tokens_in(batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _append_metrics(path: Path, record: dict):
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


def read_metrics(output_dir) -> list:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_metrics(output_dir, step: int):
    """On resume, forget what a killed run logged after its last checkpoint."""
    kept = [r for r in read_metrics(output_dir) if r["step"] <= step]
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(temporary, path)


def train(accelerator, model, optimizer, scheduler, dataset, collate_fn, args: LoopArguments, state: TrainState,
          num_training_steps: int, evaluate=None, flops_per_token=None) -> TrainState:
    """Run optimizer steps until `num_training_steps`; returns the final state.

    `model`, `optimizer` come from `accelerator.prepare`; `scheduler` is a plain LambdaLR
    registered for checkpointing; `dataset[i]` gives one example and `collate_fn` a batch
    dict with `labels`; `evaluate(step) -> dict` (called on every process) is logged.
    `flops_per_token` enables MFU when the device peak is known.
    """
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        _truncate_metrics(output_dir, state.step)
    peak = peak_flops_per_device(args)
    progress = tqdm(total=num_training_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="train", unit="step")
    window_loss, window_micro, window_tokens, window_started = 0.0, 0, 0, time.time()
    session_started = time.time()
    train_seconds_before = state.train_seconds
    grad_norm = None
    model.train()
    while state.step < num_training_steps:
        sampler = ShardedEpochSampler(len(dataset), args.per_device_train_batch_size, args.seed, state.epoch,
                                      accelerator.process_index, accelerator.num_processes, state.batch_in_epoch)
        if sampler.batches_per_process() == 0:
            raise ValueError(
                f"{len(dataset)} training examples do not fill one batch of {args.per_device_train_batch_size} "
                f"on each of {accelerator.num_processes} processes: add data or lower --per_device_train_batch_size"
            )
        loader = DataLoader(dataset, batch_size=args.per_device_train_batch_size, sampler=sampler,
                            collate_fn=collate_fn, drop_last=True)
        for batch in loader:
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            state.tokens_seen += _tokens_in(batch) * accelerator.num_processes
            window_loss += loss.detach().float()
            window_micro += 1
            window_tokens += _tokens_in(batch)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            progress.update(1)
            if state.step % args.logging_steps == 0 or state.step == num_training_steps:
                totals = accelerator.reduce(
                    torch.tensor([float(window_loss), window_micro, window_tokens], device=accelerator.device), "sum"
                )
                seconds = time.time() - window_started
                tokens = int(totals[2])
                record = {
                    "step": state.step,
                    "loss": float(totals[0] / totals[1]),
                    **_learning_rates(optimizer),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_second": tokens / seconds,
                    "tokens_per_second_per_device": tokens / seconds / accelerator.num_processes,
                }
                if flops_per_token and peak:
                    record["mfu"] = tokens / seconds * flops_per_token / (peak * accelerator.num_processes)
                log_metrics(accelerator, output_dir, record, progress)
                window_loss, window_micro, window_tokens, window_started = 0.0, 0, 0, time.time()
            if evaluate is not None and args.eval_steps and state.step % args.eval_steps == 0 \
                    and state.step < num_training_steps:
                log_metrics(accelerator, output_dir, {"step": state.step, **evaluate(state.step)}, progress)
                model.train()
                window_started = time.time()
            if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
                state.train_seconds = train_seconds_before + time.time() - session_started
                save_checkpoint(accelerator, args, state)
                window_started = time.time()
            if state.step >= num_training_steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    state.train_seconds = train_seconds_before + time.time() - session_started
    return state


def _learning_rates(optimizer) -> dict:
    """`lr` of the first non-embedding group and `lr_embedding` of the embedding group."""
    rates = {}
    for group in optimizer.param_groups:
        key = "lr_embedding" if group.get("embedding") else "lr"
        rates.setdefault(key, group["lr"])
    return rates


def log_metrics(accelerator, output_dir, record, progress=None):
    """Log `record` (with a "step") to the trackers, metrics.jsonl and the console (main process)."""
    output_dir = Path(output_dir)
    step = record["step"]
    scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    accelerator.log(scalars, step=step)
    if accelerator.is_main_process:
        _append_metrics(output_dir / METRICS_FILE, record)
        output_dir.mkdir(parents=True, exist_ok=True)
        if progress is None:
            print(json.dumps(record), flush=True)
            return
        shown = {k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "lr", "grad_norm", "mfu")
                 or k.endswith("bits_per_character")}
        progress.set_postfix(shown, refresh=False)
        progress.write(json.dumps(record))


# --------------------------------------------------------------------------- saving


def save_consolidated(accelerator, model, output_dir, tokenizer=None, dtype="bfloat16", max_shard_size="5GB"):
    """Full weights as sharded safetensors + index in `output_dir` (all processes call this).

    Under ZeRO-3 `accelerator.get_state_dict` gathers the partitions (every process takes
    part; only the main process holds the result), then the main process writes into a
    temporary folder and moves the files in, so `output_dir` never holds a half-written model.
    """
    state_dict = accelerator.get_state_dict(model)
    output_dir = Path(output_dir)
    if accelerator.is_main_process:
        torch_dtype = getattr(torch, dtype)
        state_dict = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        unwrapped = accelerator.unwrap_model(model)
        temporary = output_dir / ".tmp-model"
        shutil.rmtree(temporary, ignore_errors=True)
        unwrapped.config.dtype = torch_dtype
        unwrapped.save_pretrained(temporary, state_dict=state_dict, max_shard_size=max_shard_size,
                                  safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        for stale in list(output_dir.glob("model*.safetensors")) + list(output_dir.glob("model.safetensors.index.json")):
            stale.unlink()
        for item in temporary.iterdir():
            os.replace(item, output_dir / item.name)
        temporary.rmdir()
    accelerator.wait_for_everyone()


def plot_metrics(output_dir, keys=("loss",), eval_suffix="bits_per_character") -> Path:
    """`<output_dir>/loss_curve.png`: training loss per step, eval bits/char on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            axes[0].plot(*zip(*points), label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss (nats/token)")
    axes[0].legend()
    eval_keys = sorted({k for r in records for k in r if k.endswith(eval_suffix)})
    for key in eval_keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        axes[1].plot(*zip(*points), marker="o", label=key)
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out bits per character")
    if eval_keys:
        axes[1].legend()
    figure.tight_layout()
    path = Path(output_dir) / "loss_curve.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
