#!/usr/bin/env python
"""Continued pretraining of a base model with an extended tokenizer on a JA/EN mix.

    accelerate launch --config_file accelerate_configs/zero3.yaml scripts/pretrain.py \\
        --model_name_or_path mistralai/Mistral-7B-v0.1 --tokenizer_name outputs/tokenizer \\
        --train_token_dir outputs/mix/tokens --eval_files_ja ja_eval.jsonl.gz --eval_files_en en_eval.jsonl.gz \\
        --block_size 4096 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 \\
        --gradient_checkpointing --checkpointing_steps 500 --output_dir outputs/pretrain

Steps, top to bottom (the shape of transformers' run_clm_no_trainer.py; the shared blocks
live in toolkit/training.py, toolkit/embeddings.py, toolkit/token_shards.py, toolkit/losses.py):
 1. check every input (model, tokenizers, vocabulary, token shards, block size) before any compute
 2. the corpus, tokenised once outside training (token shards, EOS after every document), read
    memory-mapped in blocks: no tokenisation here, host memory O(1) in corpus size; position ids
    restart after each EOS so attention stays inside each document (--cross_document_attention: not)
 3. load the model, extend its embeddings for the new tokens; the sliding window is turned off for
    training when the block fits in it (the same maths, no dense mask)
 4. AdamW + warmup/cosine, accelerator.prepare, the fused LM-head loss (chunked; Liger on GPU),
    resume from a checkpoint if asked (refused if the data, world size or batch changed); the new
    embedding rows' own learning rate (--new_embeddings_lr_multiplier) and the EEVE stage
    (--train_new_embeddings_only_steps) act around each optimizer step
 5. the loop, with held-out JA/EN loss and bits per character at the start, every --eval_steps, at the end
 6. a consolidated 16-bit safetensors model (sharded + index), tokenizer, generation config with
    EOS, loss-curve PNG and training_report.json in --output_dir
"""

import contextlib
import importlib.util
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from toolkit import assets, packing, preflight, training
from toolkit.corpus import CorpusError, expand_paths, read_texts
from toolkit.embeddings import (DATA_INITS, INITS, FitSettings, NewEmbeddingsOnlyStage, NewRowsLearningRate,
                                check_extension, extend_embeddings, mine_contexts)
from toolkit.losses import apply_liger_kernels, require_liger, use_fused_loss
from toolkit.metrics import BitsPerCharacter, count_windows, text_nll, token_ids_with_bos
from toolkit.reports import write_json_atomic
from toolkit.token_shards import TokenBlocks, TokenShardError, check_tokenizer_matches
from toolkit.quiet import quiet_by_default


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Base model: Hub id, local folder or offline:NAME."})
    tokenizer_name: str = field(metadata={"help": "The extended tokenizer (a folder from extend_tokenizer.py)."})
    base_tokenizer_name: str = field(default=None, metadata={"help": "The model's own tokenizer (default: the model's)."})
    embedding_init: str = field(
        default="piece_fit",
        metadata={"help": f"New-token rows: {', '.join(INITS)} (toolkit/embeddings.py; measured in BENCHMARKS.md). "
                  f"{' and '.join(DATA_INITS)} fit them to the base model on contexts of --train_token_dir."})
    embedding_init_context_tokens: int = field(
        default=8192, metadata={"help": "Tokens of --train_token_dir the data-aware init reads (windows of 64)."})
    embedding_init_steps: int = field(default=FitSettings.steps, metadata={"help": "Steps of the data-aware init."})
    embedding_init_target_layer: int = field(
        default=FitSettings.target_layer,
        metadata={"help": "distill: hidden states are matched after this many layers (cost grows with it)."})
    pad_to_multiple_of: int = field(default=64, metadata={"help": "Embedding rows are padded to a multiple of this."})
    attn_implementation: str = field(
        default=None,
        metadata={"help": "Default: flash_attention_2 when installed on a GPU (each micro-batch flattened to one "
                  "row with explicit document boundaries), else "
                  "flex_attention on a GPU (skips the masked blocks), else sdpa (CPU). See BENCHMARKS.md."},
    )
    use_liger_kernel: bool = field(
        default=False,
        metadata={"help": "GPU: Liger-Kernel's fused linear cross-entropy and RMSNorm/RoPE/SwiGLU kernels "
                  "(pip install -r requirements-gpu.txt)."},
    )
    chunked_loss: bool = field(
        default=True,
        metadata={"help": "The LM head + cross-entropy a chunk of tokens at a time (never B x T x V logits). "
                  "false: transformers' plain loss (the baseline in BENCHMARKS.md)."},
    )
    loss_chunk_size: int = field(
        default=1024, metadata={"help": "Tokens per chunk of the chunked loss (120k vocabulary: 0.5 GB of fp32 logits)."})
    save_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the saved model (bfloat16, float16, float32)."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard of the saved model."})


@dataclass
class DataArguments:
    train_token_dir: str = field(
        metadata={"help": "Token shards of the mixed corpus for --tokenizer_name (a folder with token_shards.json, "
                  "written by the mix stage)."})
    eval_files_ja: list[str] = field(default=None, metadata={"help": "Held-out Japanese JSONL(.gz) for eval loss and bits/char."})
    eval_files_en: list[str] = field(default=None, metadata={"help": "Held-out English JSONL(.gz) for eval loss and bits/char."})
    text_field: str = field(default="text", metadata={"help": "Text field of the eval JSONL files."})
    block_size: int = field(default=2048, metadata={"help": "Tokens per packed training sequence."})
    max_eval_documents: int = field(default=32, metadata={"help": "First N documents of each eval language."})
    max_train_characters: int = field(
        default=None,
        metadata={"help": "Train until this many corpus characters are seen in expectation (steps from the shards' "
                  "characters per token): arms with different tokenizers see the same text. Overrides "
                  "--max_train_steps and --num_train_epochs."})
    cross_document_attention: bool = field(
        default=False,
        metadata={"help": "Plain causal attention over the whole block, positions not reset (the old behaviour). "
                  "Default: each token attends only to its own document."})


@dataclass
class PretrainArguments(training.LoopArguments):
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (after warmup)."})
    eval_at_start: bool = field(default=True, metadata={"help": "Evaluate before the first step (step 0)."})
    new_embeddings_lr_multiplier: float = field(
        default=4.0,  # measured best of 1, 2, 4, 8, 16 on two seeds (BENCHMARKS.md); 1 turns it off
        metadata={"help": "The new tokens' embedding rows (input and output) learn at this multiple of the "
                  "embedding learning rate, at every step of the schedule; base rows and the body are unchanged. "
                  "Composes with --train_new_embeddings_only_steps (toolkit.embeddings.NewRowsLearningRate; "
                  "measured in BENCHMARKS.md)."})
    ignore_disk_check: bool = field(
        default=False, metadata={"help": "Start even when the preflight plan finds too little disk under --output_dir "
                                 "for --checkpoints_total_limit + 1 checkpoints and the final model."})


# --------------------------------------------------------------------------- 1. inputs


def fail(message):
    raise SystemExit(f"pretrain.py: error: {message}")


def check_inputs(model_args, data_args, args):
    """Everything that can be wrong with the inputs, found before any compute is spent."""
    if not args.output_dir:
        fail("--output_dir is required")
    if not (math.isfinite(args.new_embeddings_lr_multiplier) and args.new_embeddings_lr_multiplier > 0):
        fail(f"--new_embeddings_lr_multiplier must be a positive number, not {args.new_embeddings_lr_multiplier}: "
             "1 gives the new rows the embedding learning rate, 4 four times it")
    if model_args.embedding_init not in INITS:
        fail(f"--embedding_init must be one of {', '.join(INITS)}, not {model_args.embedding_init!r}")
    model_path = assets.resolve(model_args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        fail(f"cannot load the model config from {model_args.model_name_or_path!r} ({error}); "
             "give a Hub id, a folder with config.json, or an offline:NAME")
    base_tokenizer_path = assets.resolve(model_args.base_tokenizer_name or model_args.model_name_or_path)
    tokenizers = {}
    for role, path in (("--tokenizer_name", assets.resolve(model_args.tokenizer_name)),
                       ("base tokenizer", base_tokenizer_path)):
        try:
            tokenizers[role] = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as error:
            fail(f"cannot load the {role} from {path!r} ({error})")
    tokenizer, base_tokenizer = tokenizers["--tokenizer_name"], tokenizers["base tokenizer"]
    try:
        check_extension(base_tokenizer, tokenizer, name=f"--tokenizer_name {model_args.tokenizer_name}",
                        base_name=f"tokenizer of {model_args.model_name_or_path}")
    except ValueError as error:
        fail(str(error))
    if config.vocab_size < len(base_tokenizer):
        fail(f"{model_args.model_name_or_path} has {config.vocab_size} embedding rows but its tokenizer "
             f"{len(base_tokenizer)} tokens: they do not belong together (pass --base_tokenizer_name)")
    if tokenizer.eos_token_id is None:
        fail(f"--tokenizer_name {model_args.tokenizer_name} has no EOS token: documents must end with one")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and data_args.block_size > context:
        fail(f"--block_size {data_args.block_size} is beyond the {context}-token context of "
             f"{model_args.model_name_or_path} (max_position_embeddings): use --block_size {context} or less")
    if data_args.block_size < 2:
        fail("--block_size must be at least 2")
    if model_args.use_liger_kernel:
        try:
            require_liger()
        except ImportError as error:
            fail(str(error))
    try:
        train_blocks = TokenBlocks(data_args.train_token_dir, data_args.block_size,
                                   per_document=not data_args.cross_document_attention)
        check_tokenizer_matches(train_blocks.manifest, assets.resolve(model_args.tokenizer_name),
                                data_args.train_token_dir, f"--tokenizer_name {model_args.tokenizer_name}")
    except TokenShardError as error:
        fail(str(error))
    if len(train_blocks) == 0:
        fail(f"--train_token_dir {data_args.train_token_dir} holds {train_blocks.manifest['tokens']} tokens, fewer "
             f"than one block of {data_args.block_size} per shard file: add data or lower --block_size")
    files = {}
    try:
        for language in ("ja", "en"):
            patterns = getattr(data_args, f"eval_files_{language}")
            files[language] = expand_paths(patterns) if patterns else []
    except CorpusError as error:
        fail(str(error))
    return config, tokenizer, base_tokenizer, train_blocks, files


# --------------------------------------------------------------------------- 2. data


def training_steps(data_args, args, blocks, tokens_per_step, steps_per_epoch):
    """Optimizer steps: from --max_train_characters (in expectation, at the shards' characters per
    token), else --max_train_steps, else epochs."""
    if data_args.max_train_characters is not None:
        characters_per_step = tokens_per_step * blocks.manifest["characters"] / blocks.manifest["tokens"]
        return max(1, math.ceil(data_args.max_train_characters / characters_per_step))
    if args.max_train_steps is not None:
        return args.max_train_steps
    return steps_per_epoch * args.num_train_epochs


def sliding_window_for_training(config, block_size):
    """The model's sliding window, or None when a block fits in it: then the window changes nothing
    and transformers would build a dense (T x T) mask for it (and SDPA leave its fast kernels)."""
    window = getattr(config, "sliding_window", None)
    return None if window is not None and block_size <= window else window


# --------------------------------------------------------------------------- 5. evaluation


def make_evaluate(accelerator, model, tokenizer, eval_texts, block_size):
    """evaluate(step) -> {eval_<lang>_loss, eval_<lang>_bits_per_character, ...} over all processes.

    Documents are split across processes; under ZeRO-3 every forward pass needs every
    process, so processes with fewer windows run padding passes whose result is discarded.
    """

    def evaluate(step):
        model.eval()
        figures = {}
        for language, texts in eval_texts.items():
            mine = BitsPerCharacter(0.0, 0, 0, 0)
            documents = [(text, token_ids_with_bos(tokenizer, text))
                         for text in texts[accelerator.process_index::accelerator.num_processes]]
            passes = sum(count_windows(len(ids), max_length=block_size) for _, ids in documents)
            most = int(accelerator.gather(torch.tensor([passes], device=accelerator.device)).max())
            for text, ids in documents:
                mine.nll_nats += text_nll(model, ids, max_length=block_size)
                mine.characters += len(text)
                mine.utf8_bytes += len(text.encode("utf-8"))
                mine.tokens += len(ids) - 1
            with torch.no_grad():
                for _ in range(most - passes):
                    model(input_ids=torch.tensor([[tokenizer.eos_token_id] * 2], device=accelerator.device))
            totals = accelerator.reduce(torch.tensor(
                [mine.nll_nats, mine.characters, mine.utf8_bytes, mine.tokens], dtype=torch.float64,
                device=accelerator.device), "sum").tolist()
            result = BitsPerCharacter(totals[0], int(totals[1]), int(totals[2]), int(totals[3]))
            figures[f"eval_{language}_loss"] = result.nll_nats / max(result.tokens, 1)
            figures[f"eval_{language}_bits_per_character"] = result.bits_per_character
            figures[f"eval_{language}_characters_per_token"] = result.characters_per_token
            figures[f"eval_{language}_documents"] = len(texts)
        return figures

    return evaluate


# --------------------------------------------------------------------------- 3. model


@contextlib.contextmanager
def zero3_init(accelerator):
    """Load and extend the model as the accelerate config says: with `zero3_init_flag: true`
    under deepspeed.zero.Init (each process holds only its partition; the embedding init
    gathers the two matrices), otherwise as a plain full model on every process, which
    accelerator.prepare then partitions (accelerate registers its DeepSpeed config with
    transformers either way, so it is unset here while loading)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


# --------------------------------------------------------------------------- main


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        model_args, data_args, args = parser.parse_yaml_file(sys.argv[1]) if sys.argv[1].endswith(("yaml", "yml")) \
            else parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, args = parser.parse_args_into_dataclasses()
    started = time.time()

    # 1. inputs, before any compute
    config, tokenizer, base_tokenizer, train_blocks, files = check_inputs(model_args, data_args, args)
    accelerator = training.make_accelerator(args, project_name="pretrain")
    baseline_rss = preflight.current_rss_bytes()  # CPU plan: what this process holds before the model
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    eval_texts = {}
    for language in ("ja", "en"):
        if files[language]:
            try:
                texts, _ = read_texts(files[language], data_args.text_field, False)
            except CorpusError as error:
                fail(str(error))
            eval_texts[language] = [t for t in texts if t.strip()][: data_args.max_eval_documents]

    # 2. data: memory-mapped token shards, nothing to tokenise or wait for
    data_stats = train_blocks.stats()
    accelerator.print(f"training data: {data_stats}")

    # 3. model, extended before accelerator.prepare partitions it
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    on_gpu = torch.cuda.is_available()
    attention = model_args.attn_implementation or (
        "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn")
        else "flex_attention" if on_gpu else "sdpa"
    )
    with zero3_init(accelerator):
        model = AutoModelForCausalLM.from_pretrained(assets.resolve(model_args.model_name_or_path), dtype=dtype,
                                                     attn_implementation=attention)
        contexts = mine_contexts(data_args.train_token_dir, max_tokens=model_args.embedding_init_context_tokens,
                                 seed=args.seed) if model_args.embedding_init in DATA_INITS else None
        embedding_report = extend_embeddings(
            model, tokenizer, base_tokenizer, init=model_args.embedding_init, contexts=contexts,
            pad_to_multiple_of=model_args.pad_to_multiple_of,
            fit=FitSettings(steps=model_args.embedding_init_steps, target_layer=model_args.embedding_init_target_layer))
    accelerator.print(f"embeddings: {embedding_report}")
    if model_args.use_liger_kernel:
        apply_liger_kernels(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    saved_sliding_window = getattr(model.config, "sliding_window", None)
    model.config.sliding_window = sliding_window_for_training(model.config, data_args.block_size)
    # No KV cache in training: with one, transformers does not detect the packed documents in the
    # position ids, and attention would silently cross documents (tests/test_losses.py).
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    flops_per_token = training.model_flops_per_token(model.config, data_args.block_size, num_parameters)

    # 4. optimizer, schedule, prepare, fused loss, resume
    tokens_per_step = args.per_device_train_batch_size * accelerator.num_processes \
        * args.gradient_accumulation_steps * data_args.block_size
    steps_per_epoch = len(train_blocks) // (args.per_device_train_batch_size * accelerator.num_processes) \
        // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        fail(f"{len(train_blocks)} blocks do not make one optimizer step of {args.per_device_train_batch_size} x "
             f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation: add data "
             "or lower --per_device_train_batch_size / --gradient_accumulation_steps")
    num_training_steps = training_steps(data_args, args, train_blocks, tokens_per_step, steps_per_epoch)
    plan = preflight.plan_for_run(accelerator, model.config, num_parameters, args, model_args, data_args,
                                  num_training_steps, baseline_rss)
    accelerator.print(preflight.format_plan(plan))
    if not args.ignore_disk_check:
        try:
            preflight.check_disk(plan)
        except preflight.PreflightError as error:
            fail(str(error))
    stage = None
    if args.train_new_embeddings_only_steps:
        stage = NewEmbeddingsOnlyStage(model, first_new_row=len(base_tokenizer),
                                       steps=args.train_new_embeddings_only_steps)
    optimizer = training.make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    new_rows = None
    if args.new_embeddings_lr_multiplier != 1 and len(tokenizer) > len(base_tokenizer):  # only with new tokens
        new_rows = NewRowsLearningRate(accelerator.unwrap_model(model), first_new_row=len(base_tokenizer),
                                       multiplier=args.new_embeddings_lr_multiplier)

    def before_step(step):
        if stage is not None:
            stage(step)
        if new_rows is not None:
            new_rows.remember(step)

    loss_implementation = "liger" if model_args.use_liger_kernel else "chunked" if model_args.chunked_loss else "plain"
    use_fused_loss(accelerator.unwrap_model(model), loss_implementation, chunk_size=model_args.loss_chunk_size)
    scheduler = training.make_scheduler(optimizer, args, max(num_training_steps, 1))
    accelerator.register_for_checkpointing(scheduler)
    signature = training.data_signature(accelerator, args, {
        "tokenizer_fingerprint": data_stats["tokenizer_fingerprint"], "tokens": data_stats["tokens"],
        "files": data_stats["files"], "block_size": data_args.block_size,
        "per_document": not data_args.cross_document_attention})
    try:
        state = training.resume(accelerator, args, signature)
    except ValueError as error:
        fail(str(error))
    tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                      for k, v in {**asdict(model_args), **asdict(data_args), **asdict(args)}.items()}
    accelerator.init_trackers("pretrain", config=tracker_config)

    # 5. train, with evaluation
    evaluate = make_evaluate(accelerator, model, tokenizer, eval_texts, data_args.block_size) if eval_texts else None
    start_figures = {}
    if evaluate and args.eval_at_start and state.step == 0:
        start_figures = evaluate(0)
        training.log_metrics(accelerator, output_dir, {"step": 0, **start_figures})
    accelerator.print(f"{num_training_steps} steps, {steps_per_epoch} per epoch; {tokens_per_step} tokens per step")
    startup_seconds = time.time() - started
    first_step_seconds = []
    per_document = not data_args.cross_document_attention
    probe = packing.DocumentAttentionProbe(accelerator.unwrap_model(model)) if per_document else None
    try:
        state = training.train(accelerator, model, optimizer, scheduler, train_blocks,
                               packing.document_collate(attention, per_document), args, state, num_training_steps,
                               evaluate=evaluate, flops_per_token=flops_per_token, before_step=before_step,
                               after_step=new_rows.apply if new_rows is not None else None,
                               on_first_step=lambda: first_step_seconds.append(time.time() - started))
    except packing.DocumentAttentionError as error:
        fail(str(error))
    if stage is not None:
        stage(num_training_steps)  # everything trainable again before saving
    final_figures = {}
    if evaluate:
        final_figures = evaluate(state.step)
        training.log_metrics(accelerator, output_dir, {"step": state.step, **final_figures})

    # 6. outputs (with the model's own sliding window)
    accelerator.unwrap_model(model).config.sliding_window = saved_sliding_window
    accelerator.unwrap_model(model).config.use_cache = True
    training.save_consolidated(accelerator, model, output_dir, tokenizer=tokenizer, dtype=model_args.save_dtype,
                               max_shard_size=model_args.max_shard_size)
    peak_rss = accelerator.gather(torch.tensor([preflight.peak_rss_bytes()], device=accelerator.device)).tolist()
    accelerator.end_training()
    if accelerator.is_main_process:
        plot = training.plot_metrics(output_dir)
        seconds = state.train_seconds
        devices = accelerator.num_processes
        device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
        peak, peak_source = training.device_peak_flops(args, device_name if on_gpu else None)
        throughput = state.tokens_seen / seconds if seconds else None
        characters_per_token = data_stats["characters_per_token"]
        write_json_atomic(output_dir / "training_report.json", {
            "model": model_args.model_name_or_path,
            "tokenizer": model_args.tokenizer_name,
            "steps": state.step,
            "epochs_completed": state.epoch,
            "tokens_seen": state.tokens_seen,
            "characters_seen": round(state.tokens_seen * characters_per_token),
            "characters_seen_note": "tokens seen x the shards' characters per token (in expectation)",
            "max_train_characters": data_args.max_train_characters,
            "tokens_per_step": tokens_per_step,
            "train_wall_seconds": seconds,
            "eval_and_checkpoint_seconds": state.pause_seconds,
            "total_wall_seconds_this_session": time.time() - started,
            "startup_seconds": startup_seconds,
            "seconds_to_first_step": first_step_seconds[0] if first_step_seconds else None,
            "processes": devices,
            "device": device_name,
            "gpu_hours": (seconds + state.pause_seconds) * devices / 3600 if on_gpu else 0.0,
            "tokens_per_second": throughput,
            "tokens_per_second_per_device": throughput / devices if throughput else None,
            "throughput_note": "training steps only: evaluation and checkpoint time excluded (eval_and_checkpoint_seconds)",
            "flops_per_token": flops_per_token,
            "flops_formula": "6*N + 12*L*H*Q*T (PaLM; N = matmul parameters, T = block size)",
            "mfu": throughput * flops_per_token / (peak * devices) if throughput and peak else None,
            "mfu_formula": "tokens_per_second * flops_per_token / (processes * peak_flops_per_device)",
            "peak_flops_per_device": peak,
            "peak_flops_source": peak_source,
            "parameters": num_parameters,
            "mixed_precision": accelerator.mixed_precision,
            "distributed_type": str(accelerator.distributed_type),
            "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if accelerator.state.deepspeed_plugin else None,
            "zero3_init": bool(accelerator.state.deepspeed_plugin and accelerator.state.deepspeed_plugin.zero3_init_flag),
            "eos_appended": True,  # the token shards end every document with EOS (tests/test_token_shards.py)
            "attn_implementation": attention,
            "per_document_attention_requested": per_document,
            # from what the attention kernel received on the first micro-batch (toolkit/packing.py)
            "per_document_attention": probe.result["per_document_attention"] if probe and probe.result else False
            if not per_document else None,  # None: no micro-batch had a document start inside a row
            "attention_probe": probe.result if probe else None,
            "sliding_window_for_training": sliding_window_for_training(config, data_args.block_size),
            "loss_implementation": loss_implementation,
            "preflight": plan,
            "peak_rss_bytes_per_process": peak_rss,
            "train_new_embeddings_only_steps": args.train_new_embeddings_only_steps,
            "new_embeddings_lr_multiplier": args.new_embeddings_lr_multiplier,
            "resumed_from": state.resumed_from,
            "eval_at_start": start_figures,
            "final_eval": final_figures,
            "embeddings": embedding_report,
            "data": data_stats,
            "loss_curve": plot.name,
            "arguments": {"model": asdict(model_args), "data": asdict(data_args), "training": asdict(args)},
        })
        print(f"model, tokenizer and training_report.json in {output_dir}")


if __name__ == "__main__":
    main()
