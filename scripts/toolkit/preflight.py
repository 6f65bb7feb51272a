"""The preflight plan: what a training run will need, printed and written before its first step.

    count_parameters(config) -> int      parameters of `config`'s model, built on the meta device (no memory)
    make_plan(config, parameters, setup) -> dict
                    per-process memory by component, checkpoint size, free disk under --output_dir,
                    tokens per step and steps to the budget; `setup` is a PlanSetup (world size, batch,
                    block, dtypes, ZeRO stage and offload, gradient checkpointing, loss, checkpoints kept)
    check_disk(plan)            PreflightError when the disk cannot hold --checkpoints_total_limit + 1
                                checkpoints and the final model (pretrain.py: `--ignore_disk_check` overrides)
    format_plan(plan) -> str    the table printed before the first step
    peak_rss_bytes() -> int     this process's peak resident set size so far (measured, for the report)

The estimate, per process (bytes; P parameters, W processes, b bytes of the model dtype, B x T tokens of a
micro-batch, L layers, H hidden, I intermediate, V vocabulary):

- model states, ZeRO-3 partitions: b P / W (the parameters; DeepSpeed keeps them beside its master copy) +
  4 P / W (fp32 master) + 8 P / W (Adam m, v) + g P / W (the gradient partition, --grad_accum_dtype).
  Optimizer offload moves the fp32 master, Adam and gradient partitions to CPU memory.
- gathered parameters: ZeRO-3 gathers a layer at a time (plus the prefetched next one) and the LM head
  for the fused loss: b (2 x layer + V H).
- activations: with --gradient_checkpointing each layer keeps its input (B T H b) and one layer is
  recomputed at a time; without, every layer keeps ~(8 H + 2 kv + 4 I) values per token (the inputs of
  its matmuls, norms and activation; flash/flex/sdpa keep no T x T matrix).
- loss: chunked: the head's gradient (V H b) + one chunk's logits (chunk V b) + 128 MiB of fp32 rows +
  the hidden states' gradient (B T H b); plain: B T V (b + 4 + 4) (logits, fp32 copy, log-softmax).
- buffers: DeepSpeed's reduce and gather buckets (2 x H^2 x 4 bytes, accelerate's "auto"), and on GPUs
  1 GiB for the CUDA context, NCCL and the allocator's spare blocks.

On CPU (the tests, the demo) the figure is the peak resident set size, accounted as follows:
- the baseline (Python, torch, transformers, accelerate, tokenizers, the eval texts: ~0.4 GiB) is
  *measured* when the plan is made, right after the Accelerator exists (`baseline_rss`);
- `runtime_libraries`: a stated constant (CPU_RUNTIME_LIBRARIES, 0.33 GB) for what is mapped later
  whatever the model (DeepSpeed's engine and compiled CPU comm op at `accelerator.prepare`);
- with `zero3_init_flag: false` every process loads the whole model before `accelerator.prepare`
  partitions it: 3 copies of it are counted (the checkpoint's tensors as read, the model, and the
  resized embedding matrices beside the old ones), on top of the training components, because glibc
  keeps freed heap pages resident, so the load's peak and the training's add up.
tests/test_preflight.py checks the estimate against the measured peak RSS of every process of
2-process ZeRO-3 runs of two shapes (4M and 42M parameters): within 25%.

Checkpoint: `accelerator.save_state` under ZeRO-3 writes every rank's fp32 master and Adam partitions
(12 P bytes in all) plus the 16-bit weights (b P); the final model is --save_dtype (2 P for bf16).
"""

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
# CPU only: what the process maps after the plan is made and before its peak, independent of the model:
# DeepSpeed's engine and its compiled CPU communication op (loaded at accelerator.prepare), autograd's
# and gloo's threads. Measured, not derived: the intercept of the two shapes in tests/test_preflight.py
# (CPU-2, torch 2.13, deepspeed 0.19.8, 0.33 GB).
CPU_RUNTIME_LIBRARIES = 330 * 2**20


class PreflightError(ValueError):
    """The run cannot finish as planned (disk)."""


@dataclass
class PlanSetup:
    world_size: int
    micro_batch: int
    block_size: int
    gradient_accumulation_steps: int
    num_training_steps: int
    dtype_bytes: int  # 2 for bf16/fp16 training, 4 for fp32
    grad_accum_bytes: int
    gradient_checkpointing: bool
    loss_implementation: str
    loss_chunk_size: int
    output_dir: str
    checkpointing_steps: int
    checkpoints_total_limit: int
    save_dtype_bytes: int
    on_gpu: bool
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    full_model_per_process_at_load: bool = False  # zero3_init_flag false: every process loads it whole
    baseline_rss: int = 0  # CPU: the measured resident set size before the model is loaded


def count_parameters(config) -> int:
    """Parameters of the model `config` describes, counted on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def plan_for_run(accelerator, config, parameters, args, model_args, data_args, num_training_steps, baseline_rss):
    """make_plan for pretrain.py's arguments and accelerator (DeepSpeed stage, offload, precision)."""
    import torch

    plugin = accelerator.state.deepspeed_plugin
    zero = (plugin.deepspeed_config.get("zero_optimization", {}) if plugin else {})
    dtype_bytes = 2 if accelerator.mixed_precision in ("bf16", "fp16") else 4
    sizes = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
    loss = "liger" if model_args.use_liger_kernel else "chunked" if model_args.chunked_loss else "plain"
    setup = PlanSetup(
        world_size=accelerator.num_processes, micro_batch=args.per_device_train_batch_size,
        block_size=data_args.block_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_training_steps=num_training_steps, dtype_bytes=dtype_bytes,
        grad_accum_bytes=sizes[args.grad_accum_dtype] if plugin else dtype_bytes,
        gradient_checkpointing=args.gradient_checkpointing, loss_implementation=loss,
        loss_chunk_size=model_args.loss_chunk_size, output_dir=args.output_dir,
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        save_dtype_bytes=sizes[model_args.save_dtype], on_gpu=torch.cuda.is_available(),
        zero_stage=plugin.zero_stage if plugin else 0,
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
        offload_param=(zero.get("offload_param") or {}).get("device", "none") not in ("none", None),
        full_model_per_process_at_load=plugin is None or not plugin.zero3_init_flag,
        baseline_rss=baseline_rss)
    return make_plan(config, parameters, setup)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _free_disk(path: Path):
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free, str(path)


def _bytes_under(path: Path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def make_plan(config, parameters: int, setup: PlanSetup) -> dict:
    P, W, b = parameters, max(setup.world_size, 1), setup.dtype_bytes
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    I = getattr(config, "intermediate_size", 4 * H)  # noqa: E741
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or H // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    tokens = setup.micro_batch * setup.block_size
    sharded = W if setup.zero_stage == 3 else 1
    weights = b * P / sharded  # the parameters' own partitions (DeepSpeed keeps a separate fp32 master)
    optimizer = (4 + 8 + setup.grad_accum_bytes) * P / W
    states_on_device = weights + (0 if setup.offload_optimizer else optimizer)
    layer = (P - 2 * V * H) / max(L, 1)
    gathered = b * (2 * layer + V * H) if setup.zero_stage == 3 else 0
    per_token_layer = 8 * H + 2 * kv + 4 * I
    if setup.gradient_checkpointing:
        activations = L * tokens * H * b + tokens * per_token_layer * b
    else:
        activations = L * tokens * per_token_layer * b
    if setup.loss_implementation == "plain":
        loss = tokens * V * (b + 4 + 4)
    else:
        chunk = min(setup.loss_chunk_size, tokens)
        loss = V * H * b + chunk * V * b + min(2**25, chunk * V) * 4 + tokens * H * b
    buffers = 2 * H * H * 4 + (GIB if setup.on_gpu else 0)
    components = {
        "model_states": states_on_device,
        "gathered_parameters": gathered,
        "activations": activations,
        "loss": loss,
        "buffers": buffers,
    }
    if not setup.on_gpu:
        components["baseline_measured"] = setup.baseline_rss
        components["runtime_libraries"] = CPU_RUNTIME_LIBRARIES
        if setup.full_model_per_process_at_load:
            components["full_model_at_load"] = 3 * b * P
    total = sum(components.values())
    checkpoint = 12 * P + b * P
    final_model = setup.save_dtype_bytes * P
    free, disk_path = _free_disk(Path(setup.output_dir))
    kept = setup.checkpoints_total_limit + 1 if setup.checkpointing_steps else 0
    existing = _bytes_under(Path(setup.output_dir) / "checkpoints")
    needed = max(kept * checkpoint + final_model - existing, 0)
    tokens_per_step = tokens * W * setup.gradient_accumulation_steps
    return {
        "parameters": P,
        "world_size": W,
        "memory_per_process_bytes": {key: int(value) for key, value in components.items()},
        "memory_per_process_total_bytes": int(total),
        "memory_kind": "GPU memory (allocated tensors + 1 GiB context/allocator)" if setup.on_gpu
        else "CPU resident set size (measured baseline + estimated tensors)",
        "checkpoint_bytes": int(checkpoint),
        "final_model_bytes": int(final_model),
        "checkpoints_kept_at_once": kept,
        "disk_needed_bytes": int(needed),
        "disk_free_bytes": int(free),
        "disk_checked_at": disk_path,
        "tokens_per_step": tokens_per_step,
        "steps": setup.num_training_steps,
        "tokens_to_budget": tokens_per_step * setup.num_training_steps,
        "setup": asdict(setup),
    }


def reference_plan(config, parameters: int, tokens=8e9) -> dict:
    """The README's reference run: 16 x A100-40, block 4096, micro-batch 4, accumulation 4 (1M tokens per
    step), gradient checkpointing, chunked loss, bf16 with fp32 gradient accumulation, a checkpoint every
    500 steps with 3 kept, `tokens` in all."""
    tokens_per_step = 4 * 4096 * 16 * 4
    setup = PlanSetup(world_size=16, micro_batch=4, block_size=4096, gradient_accumulation_steps=4,
                      num_training_steps=math.ceil(tokens / tokens_per_step), dtype_bytes=2, grad_accum_bytes=4,
                      gradient_checkpointing=True, loss_implementation="chunked", loss_chunk_size=1024,
                      output_dir=".", checkpointing_steps=500, checkpoints_total_limit=3, save_dtype_bytes=2,
                      on_gpu=True)
    return make_plan(config, parameters, setup)


def check_disk(plan: dict):
    if plan["disk_needed_bytes"] > plan["disk_free_bytes"]:
        raise PreflightError(
            f"{plan['disk_checked_at']} has {plan['disk_free_bytes'] / GIB:,.1f} GiB free, the run needs "
            f"{plan['disk_needed_bytes'] / GIB:,.1f} GiB ({plan['checkpoints_kept_at_once']} checkpoints of "
            f"{plan['checkpoint_bytes'] / GIB:,.1f} GiB: --checkpoints_total_limit + 1 while the next is written, "
            f"and the final model, {plan['final_model_bytes'] / GIB:,.1f} GiB): free space, lower "
            "--checkpoints_total_limit, use another --output_dir, or pass --ignore_disk_check")


def format_plan(plan: dict) -> str:
    memory = plan["memory_per_process_bytes"]
    lines = [f"preflight: {plan['parameters'] / 1e9:.3g}B parameters on {plan['world_size']} processes; "
             f"per process ({plan['memory_kind']}):"]
    lines += [f"  {name.replace('_', ' '):<22} {value / GIB:8.2f} GiB" for name, value in memory.items()]
    lines.append(f"  {'total':<22} {plan['memory_per_process_total_bytes'] / GIB:8.2f} GiB")
    lines.append(f"  checkpoint {plan['checkpoint_bytes'] / GIB:,.1f} GiB x {plan['checkpoints_kept_at_once']} + final "
                 f"model {plan['final_model_bytes'] / GIB:,.1f} GiB: needs {plan['disk_needed_bytes'] / GIB:,.1f} GiB, "
                 f"{plan['disk_free_bytes'] / GIB:,.1f} GiB free at {plan['disk_checked_at']}")
    lines.append(f"  {plan['tokens_per_step']:,} tokens per step x {plan['steps']:,} steps = "
                 f"{plan['tokens_to_budget']:,} tokens")
    return "\n".join(lines)
