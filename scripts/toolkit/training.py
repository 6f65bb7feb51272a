"""The training blocks that `pretrain.py` and `finetune.py` share (the shape of transformers'
`run_clm_no_trainer.py`, each block written once).

API:

    LoopArguments                 dataclass of the loop's knobs, parsed with HfArgumentParser next to a
                                  script's own dataclasses (batch size, accumulation, LR, schedule,
                                  clipping, checkpointing, logging, output_dir, seed, ddp_timeout, ...)
    make_accelerator(args, project_name) -> Accelerator
                                  process-group timeout `--ddp_timeout` (gloo when CUDA is absent: ZeRO-3
                                  on CPU), trackers (`--report_to tensorboard|wandb|none`), DeepSpeed
                                  micro-batch, accumulation, clipping and 16-bit-gather-on-save from `args`,
                                  gradients accumulated and reduced in fp32 (deepspeed_gradient_precision)
    optimizer_param_groups(model, args) -> list[dict]
                                  no weight decay on biases, norms (< 2 dims, by the real ZeRO-3 shape) and
                                  embeddings; input/output embeddings in their own group ("embedding": True)
                                  with `--embedding_learning_rate` (default: `--learning_rate`)
    make_optimizer(model, args) -> torch.optim.AdamW   (fused on CUDA)
    make_scheduler(optimizer, args, num_training_steps) -> LambdaLR
                                  `transformers.get_scheduler` (warmup + cosine by default; `--lr_scheduler_kwargs`,
                                  with defaults for cosine_with_min_lr and warmup_stable_decay); with
                                  `--train_new_embeddings_only_steps N` body groups get LR 0 for N steps, then
                                  their own warmup (the freezing itself: toolkit.embeddings.NewEmbeddingsOnlyStage)
    TrainState                    step, epoch, batch_in_epoch, tokens_seen, train/pause seconds, data signature
    ShardedEpochSampler           deterministic per-epoch permutation (seed + epoch), split across
                                  processes, can start at a batch: exact resume without reading skipped data
    train(accelerator, model, optimizer, scheduler, dataset, collate_fn, args, state, num_training_steps,
          evaluate=None, flops_per_token=None, before_step=None, after_step=None, on_first_step=None) -> TrainState
                                  the loop: one optimizer step per `--gradient_accumulation_steps` micro-batches,
                                  loss normalised by the step's global target-token count (num_items_in_batch),
                                  clipping, scheduler, logging every `--logging_steps` (loss, lr, grad_norm,
                                  tokens/s and MFU over training time only) to the trackers, tqdm and
                                  `<output_dir>/metrics.jsonl`, `evaluate(step) -> dict` every `--eval_steps`,
                                  checkpoints every `--checkpointing_steps`
    data_signature(accelerator, args, data_fingerprint) -> dict
    save_checkpoint(accelerator, args, state) / resume(accelerator, args, signature=None) -> TrainState
                                  `accelerator.save_state` into `<output_dir>/checkpoints/.tmp-step_N`, then
                                  rename to `step_N` (atomic), keep the last `--checkpoints_total_limit`;
                                  `--resume_from_checkpoint latest|PATH` restores model, optimizer,
                                  scheduler, RNG and data position ("latest" with none found: fresh start);
                                  a checkpoint of another data signature (data, world size, batch) is refused
    save_consolidated(accelerator, model, output_dir, tokenizer=None, dtype="bfloat16", max_shard_size="5GB")
                                  full weights (ZeRO-3 gathered) as sharded safetensors + index, via
                                  `accelerator.get_state_dict` and `save_pretrained` on the main process
    model_flops_per_token(config, seq_len, num_parameters) / device_peak_flops(args, device_name=None)
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

from toolkit.embeddings import embedding_weights
from toolkit.reports import read_json, write_json_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "train_state.json"
METRICS_FILE = "metrics.jsonl"

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, matched against the full
# torch.cuda.get_device_name() in this order (first match wins), as whole words: "L4" is not
# "L40S", "H100 PCIe" is not the SXM part ("NVIDIA H100 80GB HBM3"). Sources: NVIDIA data sheets.
PEAK_BF16_FLOPS = [
    (r"\bH100\b.*\bPCIE\b", 756e12, "H100 PCIe"),
    (r"\bH100\b.*\bNVL\b", 835e12, "H100 NVL"),
    (r"\bH100\b", 989e12, "H100 SXM"),
    (r"\bH200\b.*\bNVL\b", 835e12, "H200 NVL"),
    (r"\bGH200\b", 989e12, "GH200"),
    (r"\bH200\b", 989e12, "H200 SXM"),
    (r"\bH800\b.*\bPCIE\b", 756e12, "H800 PCIe"),
    (r"\bH800\b", 989e12, "H800 SXM"),
    (r"\bB200\b", 2250e12, "B200"),
    (r"\bA100\b", 312e12, "A100 (SXM and PCIe, 40 and 80 GB)"),
    (r"\bA800\b", 312e12, "A800"),
    (r"\bL40S\b", 362e12, "L40S"),
    (r"\bL40\b", 181e12, "L40"),
    (r"\bL4\b", 121e12, "L4"),
    (r"\bA10G\b", 70e12, "A10G"),
    (r"\bA10\b", 125e12, "A10"),
    (r"\bA6000\b", 155e12, "RTX A6000"),
    (r"\bV100\b", 125e12, "V100 (fp16)"),
]


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
    lr_scheduler_kwargs: str = field(
        default=None,
        metadata={"help": "JSON of the scheduler's own arguments, e.g. '{\"min_lr_rate\": 0.1}' for "
                  "cosine_with_min_lr (its default), '{\"num_decay_steps\": 100}' for warmup_stable_decay "
                  "(default: the last 10%% of steps)."},
    )
    train_new_embeddings_only_steps: int = field(
        default=0,
        metadata={"help": "EEVE-style first stage: for N steps only the new embedding rows learn (the body is "
                  "frozen, requires_grad=False, so its weight gradients are not computed; old rows' gradients "
                  "are masked); then the body trains with its own warmup (--num_warmup_steps)."},
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
        default=None, metadata={"help": "Peak TFLOP/s of one device for MFU (default: known GPUs by full name)."}
    )
    ddp_timeout: int = field(
        default=1800, metadata={"help": "Process-group timeout in seconds (collectives that wait longer fail)."}
    )
    grad_accum_dtype: str = field(
        default="fp32",
        metadata={"help": "DeepSpeed: dtype the gradients are accumulated in over micro-batches (data_types."
                  "grad_accum_dtype). fp32 (default): no bf16 rounding of the running sum; bf16: DeepSpeed's default."},
    )
    grad_reduce_dtype: str = field(
        default="fp32",
        metadata={"help": "DeepSpeed: dtype of the gradient reduce-scatter across processes (communication_data_type). "
                  "fp32 (default) sends 2x the gradient bytes of bf16 (README: the cost); bf16: DeepSpeed's default."},
    )


# --------------------------------------------------------------------------- accelerator


def make_accelerator(args: LoopArguments, project_name: str = "train"):
    """An Accelerator for `args`; DeepSpeed's batch/accumulation/clipping come from `args`."""
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    timeout = timedelta(seconds=args.ddp_timeout)
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    trackers = [t for t in args.report_to.split(",") if t and t != "none"]
    from toolkit.quiet import library_prints

    with library_prints():  # DeepSpeed on CPU prints "deepspeed_shm_comm_op built successfully" per process
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                logging_dir=str(Path(args.output_dir) / "logs")),
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
        config.update(deepspeed_gradient_precision(args))
        accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
    accelerator.project_name = project_name
    return accelerator


def deepspeed_gradient_precision(args: LoopArguments) -> dict:
    """DeepSpeed config keys for the gradients' accumulation and reduction dtypes (deepspeed 0.19:
    `data_types.grad_accum_dtype` is ZeRO-3's gradient-partition buffer, `communication_data_type` its
    reduce-scatter). Both default to the model's dtype in DeepSpeed, i.e. bf16 sums over every
    micro-batch and process of a bf16 run; here fp32 unless --grad_accum_dtype/--grad_reduce_dtype say."""
    for name in ("grad_accum_dtype", "grad_reduce_dtype"):
        if getattr(args, name) not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--{name} must be fp32, bf16 or fp16, not {getattr(args, name)!r}")
    return {"data_types": {"grad_accum_dtype": args.grad_accum_dtype},
            "communication_data_type": args.grad_reduce_dtype}


def is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


# --------------------------------------------------------------------------- optimizer, schedule


def optimizer_param_groups(model, args: LoopArguments):
    """Three groups: decayed matrices, biases/norms (no decay), embeddings (own LR, no decay: a row's
    decay would pull rarely seen tokens towards zero). Shapes are the real ones under ZeRO-3 (`ds_shape`)."""
    embedding_ids = set(embedding_weights(model))
    groups = {
        "decay": {"name": "decay", "params": [], "weight_decay": args.weight_decay, "embedding": False},
        "no_decay": {"name": "no_decay", "params": [], "weight_decay": 0.0, "embedding": False},
        "embedding": {
            "name": "embedding", "params": [], "weight_decay": 0.0, "embedding": True,
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
        elif len(getattr(parameter, "ds_shape", parameter.shape)) < 2 or "norm" in name.lower() \
                or name.endswith(".bias"):
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


def scheduler_kwargs(args: LoopArguments, num_training_steps: int) -> dict:
    """The scheduler's own arguments: --lr_scheduler_kwargs over documented defaults."""
    defaults = {"cosine_with_min_lr": {"min_lr_rate": 0.1},
                "warmup_stable_decay": {"num_decay_steps": max(1, num_training_steps // 10)}}
    kwargs = dict(defaults.get(args.lr_scheduler_type, {}))
    if args.lr_scheduler_kwargs:
        given = json.loads(args.lr_scheduler_kwargs) if isinstance(args.lr_scheduler_kwargs, str) \
            else args.lr_scheduler_kwargs
        kwargs.update(given)
    return kwargs


def make_scheduler(optimizer, args: LoopArguments, num_training_steps: int):
    """`transformers.get_scheduler`; with --train_new_embeddings_only_steps N the body groups get LR 0
    for N steps, then their own linear warmup of --num_warmup_steps into the schedule.

    Stepped once per optimizer step by `train` (not passed to `accelerator.prepare`, which
    would step it once per process), and saved in checkpoints via `register_for_checkpointing`.
    """
    from transformers import get_scheduler

    warmup = num_warmup_steps(args, num_training_steps)
    base = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps,
        scheduler_specific_kwargs=scheduler_kwargs(args, num_training_steps),
    )
    if not args.train_new_embeddings_only_steps:
        return base
    schedule, frozen = base.lr_lambdas[0], args.train_new_embeddings_only_steps

    def body(step):
        if step < frozen:
            return 0.0
        return schedule(step) * min(1.0, (step - frozen + 1) / max(warmup, 1))

    lambdas = [schedule if group.get("embedding") else body for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


# --------------------------------------------------------------------------- data order


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per process)
    tokens_seen: int = 0  # over all processes
    train_seconds: float = 0.0  # wall time of training steps only (no eval, no checkpoint), all sessions
    pause_seconds: float = 0.0  # wall time of evaluation and checkpoints inside the loop, all sessions
    resumed_from: str = None
    data_signature: dict = None  # what the data position means: data fingerprint, world size, batch


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


def first_step_examples(size, args: LoopArguments, world_size) -> list:
    """Indices of the examples the first optimizer step of `train` reads, over all processes:
    each process's first `gradient_accumulation_steps` micro-batches of epoch 0 (a report can then
    state that step's figures exactly, e.g. its loss per character)."""
    per_process = args.per_device_train_batch_size * args.gradient_accumulation_steps
    indices = []
    for rank in range(world_size):
        sampler = ShardedEpochSampler(size, args.per_device_train_batch_size, args.seed, 0, rank, world_size)
        indices += list(sampler)[:per_process]
    return indices


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


def data_signature(accelerator, args: LoopArguments, data_fingerprint) -> dict:
    """What a checkpoint's data position depends on: the data, the world size and the micro-batch."""
    return {"data_fingerprint": data_fingerprint, "world_size": accelerator.num_processes,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed}


def resume(accelerator, args: LoopArguments, signature: dict = None) -> TrainState:
    """The state to start from: restored from `--resume_from_checkpoint`, or fresh. A checkpoint whose
    data signature differs from `signature` (other data, world size or batch) is refused: its data
    position would silently mean other examples."""
    if not args.resume_from_checkpoint:
        return TrainState(data_signature=signature)
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args)
        if not found:
            accelerator.print(f"no checkpoint in {checkpoint_root(args)}: starting from step 0")
            return TrainState(data_signature=signature)
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE}); use a step_N folder or 'latest'")
    saved = read_json(path / STATE_FILE)
    if signature is not None and saved.get("data_signature") != signature:
        before, now = saved.get("data_signature") or {}, signature
        changed = {key: (before.get(key), now.get(key)) for key in now if before.get(key) != now.get(key)}
        raise ValueError(f"{path}: cannot resume exactly, the run changed since this checkpoint: "
                         + "; ".join(f"{key} was {old!r}, now {new!r}" for key, (old, new) in changed.items())
                         + ". Resume with the same data, processes and batch, or start a new --output_dir")
    accelerator.load_state(str(path))
    state = TrainState(**saved)
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


def device_peak_flops(args: LoopArguments, device_name: str = None):
    """(dense bf16 peak FLOP/s of one device, what it was matched as): --peak_tflops_per_device, else the
    device's full name against PEAK_BF16_FLOPS; (None, reason) on CPU or an unknown GPU (no MFU then)."""
    import re

    if args.peak_tflops_per_device:
        return args.peak_tflops_per_device * 1e12, "--peak_tflops_per_device"
    if device_name is None:
        if not torch.cuda.is_available():
            return None, "cpu: no peak, no MFU"
        device_name = torch.cuda.get_device_name()
    for pattern, flops, label in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name.upper().replace("-", " ")):
            return flops, f"{label} (from device name {device_name!r})"
    return None, f"unknown device {device_name!r}: pass --peak_tflops_per_device for MFU"


# --------------------------------------------------------------------------- the loop


def _tokens_in(batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _label_tokens(batch) -> int:
    """Tokens that are a target: labels[:, 1:] != -100 (the model shifts labels by one)."""
    return int((batch["labels"][..., 1:] != -100).sum())


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


def _accumulation_windows(loader, size):
    """Lists of `size` consecutive micro-batches (one optimizer step each); a short tail is dropped."""
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []


def train(accelerator, model, optimizer, scheduler, dataset, collate_fn, args: LoopArguments, state: TrainState,
          num_training_steps: int, evaluate=None, flops_per_token=None, before_step=None, after_step=None,
          on_first_step=None) -> TrainState:
    """Run optimizer steps until `num_training_steps`; returns the final state.

    `model`, `optimizer` come from `accelerator.prepare`; `scheduler` is a plain LambdaLR
    registered for checkpointing; `dataset[i]` gives one example and `collate_fn` a batch
    dict with `labels`; `evaluate(step) -> dict` (called on every process) is logged;
    `before_step(step)` runs before each optimizer step's first micro-batch (training stages);
    `after_step(step)` right after that optimizer step (its last micro-batch; DeepSpeed steps inside
    `accelerator.backward`), before logging and checkpoints, never after a micro-batch that does not step;
    `on_first_step()` once this session's first optimizer step is done (time to first step).
    `flops_per_token` enables MFU when the device peak is known.

    The loss of an optimizer step is the mean over every target token of its micro-batches on
    every process (transformers' `num_items_in_batch`): each micro-batch's summed loss is divided
    by that step's global target count, so short and long micro-batches weigh by their tokens.
    tokens/s and MFU count training time only: evaluation and checkpoints pause the clock.
    """
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        _truncate_metrics(output_dir, state.step)
    peak, _ = device_peak_flops(args)
    progress = tqdm(total=num_training_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="train", unit="step")
    window_loss, window_steps, window_tokens, window_seconds = 0.0, 0, 0, 0.0
    grad_norm = None
    # accelerate divides a micro-batch's loss by the accumulation steps and DeepSpeed/DDP average
    # gradients over processes; the loss below is already a share of the global mean, so undo both.
    loss_scale = args.gradient_accumulation_steps * accelerator.num_processes
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
        for window in _accumulation_windows(loader, args.gradient_accumulation_steps):
            step_started = time.time()
            if before_step is not None:
                before_step(state.step)
            window = [{key: value.to(accelerator.device) if torch.is_tensor(value) else value  # max_length_q: int
                       for key, value in batch.items()} for batch in window]
            targets = accelerator.reduce(torch.tensor([sum(map(_label_tokens, window))], device=accelerator.device),
                                         "sum")
            num_items = max(int(targets), 1)
            step_loss = 0.0
            for batch in window:
                with accelerator.accumulate(model):
                    loss = model(**batch, num_items_in_batch=num_items).loss
                    accelerator.backward(loss * loss_scale)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                state.batch_in_epoch += 1
                step_tokens = _tokens_in(batch)
                state.tokens_seen += step_tokens * accelerator.num_processes
                window_tokens += step_tokens
                step_loss += loss.detach().float()
            if after_step is not None:
                after_step(state.step)
            scheduler.step()
            state.step += 1
            window_loss += step_loss
            window_steps += 1
            seconds = time.time() - step_started
            window_seconds += seconds
            state.train_seconds += seconds
            progress.update(1)
            if on_first_step is not None:
                on_first_step()
                on_first_step = None
            if state.step % args.logging_steps == 0 or state.step == num_training_steps:
                totals = accelerator.reduce(
                    torch.tensor([float(window_loss), window_tokens], device=accelerator.device), "sum"
                )
                # the same training-only window on every process: the slowest one's
                seconds = float(accelerator.gather(torch.tensor([window_seconds], device=accelerator.device)).max())
                tokens = int(totals[1])
                record = {
                    "step": state.step,
                    "loss": float(totals[0]) / window_steps,
                    **_learning_rates(optimizer),
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_second": tokens / seconds,
                    "tokens_per_second_per_device": tokens / seconds / accelerator.num_processes,
                }
                if flops_per_token and peak:
                    record["mfu"] = tokens / seconds * flops_per_token / (peak * accelerator.num_processes)
                log_metrics(accelerator, output_dir, record, progress)
                window_loss, window_steps, window_tokens, window_seconds = 0.0, 0, 0, 0.0
            paused = time.time()
            if evaluate is not None and args.eval_steps and state.step % args.eval_steps == 0 \
                    and state.step < num_training_steps:
                log_metrics(accelerator, output_dir, {"step": state.step, **evaluate(state.step)}, progress)
                model.train()
            if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, state)
            state.pause_seconds += time.time() - paused
            if state.step >= num_training_steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    return state


def _learning_rates(optimizer) -> dict:
    """`lr` of the first non-embedding group and `lr_embedding` of the embedding group."""
    rates = {}
    for group in optimizer.param_groups:
        key = "lr_embedding" if group.get("embedding") else "lr"
        rates.setdefault(key, group["lr"])
    return rates


def log_metrics(accelerator, output_dir, record, progress=None):
    """Log `record` (with a "step") to the trackers, metrics.jsonl and the console (main process): with a
    progress bar, a training record goes into the bar's postfix only (printing it would break the bar;
    every record is in metrics.jsonl), an evaluation through tqdm.write."""
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
        if "loss" not in record:  # evaluations get a line (above the bar); step records are in the bar and the log
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
        unwrapped.save_pretrained(temporary, state_dict=state_dict, max_shard_size=max_shard_size,
                                  safe_serialization=True)
        config_file = temporary / "config.json"  # save_pretrained records the training dtype
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["dtype"] = dtype
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
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
