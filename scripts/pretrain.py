#!/usr/bin/env python
"""Continued pretraining of a base model with an extended tokenizer on a JA/EN mix.

    accelerate launch --config_file accelerate_configs/zero3.yaml scripts/pretrain.py \\
        --model_name_or_path mistralai/Mistral-7B-v0.1 --tokenizer_name outputs/tokenizer \\
        --train_files outputs/mix/train.jsonl --eval_files_ja ja_eval.jsonl.gz --eval_files_en en_eval.jsonl.gz \\
        --block_size 4096 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 \\
        --gradient_checkpointing --checkpointing_steps 500 --output_dir outputs/pretrain

Steps, top to bottom (the shape of transformers' run_clm_no_trainer.py; the shared blocks
live in toolkit/training.py and toolkit/embeddings.py):
 1. check every input (model, tokenizers, vocabulary, corpus files, block size) before any compute
 2. tokenise the corpus once with datasets.map (cached), EOS after every document, pack into blocks
 3. load the model, extend its embeddings for the new tokens (before ZeRO-3 partitions it)
 4. AdamW + warmup/cosine, accelerator.prepare, resume from a checkpoint if asked
 5. the loop, with held-out JA/EN loss and bits per character at the start, every --eval_steps, at the end
 6. a consolidated 16-bit safetensors model (sharded + index), tokenizer, generation config with
    EOS, loss-curve PNG and training_report.json in --output_dir
"""

import contextlib
import importlib.util
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from toolkit import assets, training
from toolkit.corpus import CorpusError, ReadStats, expand_paths, iter_records, read_texts
from toolkit.embeddings import INITS, check_extension, extend_embeddings
from toolkit.metrics import BitsPerCharacter, count_windows, text_nll, token_ids_with_bos
from toolkit.reports import write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Base model: Hub id, local folder or offline:NAME."})
    tokenizer_name: str = field(metadata={"help": "The extended tokenizer (a folder from extend_tokenizer.py)."})
    base_tokenizer_name: str = field(default=None, metadata={"help": "The model's own tokenizer (default: the model's)."})
    embedding_init: str = field(default="subword_mean", metadata={"help": f"New-token rows: {', '.join(INITS)}."})
    pad_to_multiple_of: int = field(default=64, metadata={"help": "Embedding rows are padded to a multiple of this."})
    attn_implementation: str = field(
        default=None, metadata={"help": "Default: flash_attention_2 when installed on a GPU, else sdpa."}
    )
    save_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the saved model (bfloat16, float16, float32)."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard of the saved model."})


@dataclass
class DataArguments:
    train_files: list[str] = field(metadata={"help": "JSONL(.gz) files or globs with a text field: the mixed corpus."})
    eval_files_ja: list[str] = field(default=None, metadata={"help": "Held-out Japanese JSONL(.gz) for eval loss and bits/char."})
    eval_files_en: list[str] = field(default=None, metadata={"help": "Held-out English JSONL(.gz) for eval loss and bits/char."})
    text_field: str = field(default="text")
    block_size: int = field(default=2048, metadata={"help": "Tokens per packed training sequence."})
    max_eval_documents: int = field(default=32, metadata={"help": "First N documents of each eval language."})
    preprocessing_num_workers: int = field(default=None, metadata={"help": "datasets.map num_proc."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Count and skip bad corpus lines instead of failing."})


@dataclass
class PretrainArguments(training.LoopArguments):
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (after warmup)."})
    eval_at_start: bool = field(default=True, metadata={"help": "Evaluate before the first step (step 0)."})


# --------------------------------------------------------------------------- 1. inputs


def fail(message):
    raise SystemExit(f"pretrain.py: error: {message}")


def check_inputs(model_args, data_args, args):
    """Everything that can be wrong with the inputs, found before any compute is spent."""
    if not args.output_dir:
        fail("--output_dir is required")
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
    try:
        files = {"train": expand_paths(data_args.train_files)}
        for language in ("ja", "en"):
            patterns = getattr(data_args, f"eval_files_{language}")
            files[language] = expand_paths(patterns) if patterns else []
    except CorpusError as error:
        fail(str(error))
    return config, tokenizer, base_tokenizer, files


# --------------------------------------------------------------------------- 2. data


def corpus_rows(files, text_field, skip_bad_records):
    """Rows for datasets.Dataset.from_generator: {"text", "skip_reason"}; a skipped line or an
    empty document is a row with text None, so the counts survive datasets' cache."""
    for path, _, _ in files:
        stats = ReadStats()
        for _, record in iter_records(path, text_field, skip_bad_records, stats):
            text = record[text_field]
            yield {"text": text, "skip_reason": None} if text.strip() else {"text": None, "skip_reason": "empty_text"}
        for reason, count in stats.skipped.items():
            for _ in range(count):
                yield {"text": None, "skip_reason": reason}


def tokenize_and_pack(files, tokenizer, data_args, accelerator):
    """Packed blocks of `block_size` tokens; each document is [BOS] text EOS, documents back to back.

    Every step is cached by datasets (keyed by the files' paths, sizes and mtimes, the
    tokenizer and the block size), so a restarted or resumed run does not tokenise again.
    """
    import datasets

    keyed_files = [(path, os.path.getsize(path), os.stat(path).st_mtime_ns) for path in files]
    eos = tokenizer.eos_token_id
    block_size = data_args.block_size

    def tokenize(batch):
        encoded = tokenizer(batch["text"])["input_ids"]
        return {"input_ids": [ids + [eos] for ids in encoded]}

    def group(batch):
        concatenated = [token for ids in batch["input_ids"] for token in ids]
        usable = len(concatenated) // block_size * block_size
        return {"input_ids": [concatenated[i:i + block_size] for i in range(0, usable, block_size)]}

    with accelerator.main_process_first():
        try:
            raw = datasets.Dataset.from_generator(
                corpus_rows, gen_kwargs={"files": keyed_files, "text_field": data_args.text_field,
                                         "skip_bad_records": data_args.skip_bad_records})
        except CorpusError as error:
            fail(str(error))
        except datasets.exceptions.DatasetGenerationError as error:
            if isinstance(error.__cause__, CorpusError):
                fail(str(error.__cause__))
            raise
        skipped = Counter(reason for reason in raw["skip_reason"] if reason)
        documents = raw.filter(lambda row: row["text"] is not None, desc="drop skipped lines")
        if len(documents) == 0:
            fail(f"the training corpus {', '.join(files)} has no non-empty document")
        tokenized = documents.map(tokenize, batched=True, remove_columns=["text", "skip_reason"],
                                  num_proc=data_args.preprocessing_num_workers, desc="tokenize (EOS after each document)")
        document_tokens = sum(len(ids) for ids in tokenized["input_ids"])
        blocks = tokenized.map(group, batched=True, batch_size=1000, num_proc=data_args.preprocessing_num_workers,
                               desc=f"pack into blocks of {block_size}")
    if len(blocks) == 0:
        fail(f"the training corpus has {document_tokens} tokens, fewer than one block of {block_size}: "
             "add data or lower --block_size")
    blocks.set_format("torch")
    stats = {"files": files, "documents": len(documents), "skipped": dict(skipped),
             "document_tokens": document_tokens, "blocks": len(blocks), "block_size": block_size,
             "tokens_in_blocks": len(blocks) * block_size,
             "tokens_dropped_at_block_ends": document_tokens - len(blocks) * block_size}
    return blocks, stats


def collate(examples):
    input_ids = torch.stack([example["input_ids"] for example in examples])
    return {"input_ids": input_ids, "labels": input_ids}


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
    config, tokenizer, base_tokenizer, files = check_inputs(model_args, data_args, args)
    accelerator = training.make_accelerator(args, project_name="pretrain")
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    eval_texts = {}
    for language in ("ja", "en"):
        if files[language]:
            try:
                texts, _ = read_texts(files[language], data_args.text_field, data_args.skip_bad_records)
            except CorpusError as error:
                fail(str(error))
            eval_texts[language] = [t for t in texts if t.strip()][: data_args.max_eval_documents]

    # 2. data
    train_dataset, data_stats = tokenize_and_pack(files["train"], tokenizer, data_args, accelerator)
    accelerator.print(f"training data: {data_stats}")

    # 3. model, extended before accelerator.prepare partitions it
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    attention = model_args.attn_implementation or (
        "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"
    )
    with zero3_init(accelerator):
        model = AutoModelForCausalLM.from_pretrained(assets.resolve(model_args.model_name_or_path), dtype=dtype,
                                                     attn_implementation=attention)
        embedding_report = extend_embeddings(model, tokenizer, base_tokenizer, init=model_args.embedding_init,
                                             pad_to_multiple_of=model_args.pad_to_multiple_of)
    accelerator.print(f"embeddings: {embedding_report}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    flops_per_token = training.model_flops_per_token(model.config, data_args.block_size, num_parameters)

    # 4. optimizer, schedule, prepare, resume
    steps_per_epoch = len(train_dataset) // (args.per_device_train_batch_size * accelerator.num_processes) \
        // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        fail(f"{len(train_dataset)} blocks do not make one optimizer step of {args.per_device_train_batch_size} x "
             f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation: add data "
             "or lower --per_device_train_batch_size / --gradient_accumulation_steps")
    num_training_steps = args.max_train_steps if args.max_train_steps is not None \
        else steps_per_epoch * args.num_train_epochs
    optimizer = training.make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = training.make_scheduler(optimizer, args, max(num_training_steps, 1))
    accelerator.register_for_checkpointing(scheduler)
    state = training.resume(accelerator, args)
    tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                      for k, v in {**asdict(model_args), **asdict(data_args), **asdict(args)}.items()}
    accelerator.init_trackers("pretrain", config=tracker_config)

    # 5. train, with evaluation
    evaluate = make_evaluate(accelerator, model, tokenizer, eval_texts, data_args.block_size) if eval_texts else None
    start_figures = {}
    if evaluate and args.eval_at_start and state.step == 0:
        start_figures = evaluate(0)
        training.log_metrics(accelerator, output_dir, {"step": 0, **start_figures})
    accelerator.print(f"{num_training_steps} steps, {steps_per_epoch} per epoch; "
                      f"{args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps * data_args.block_size} tokens per step")
    state = training.train(accelerator, model, optimizer, scheduler, train_dataset, collate, args, state,
                           num_training_steps, evaluate=evaluate, flops_per_token=flops_per_token)
    final_figures = {}
    if evaluate:
        final_figures = evaluate(state.step)
        training.log_metrics(accelerator, output_dir, {"step": state.step, **final_figures})

    # 6. outputs
    training.save_consolidated(accelerator, model, output_dir, tokenizer=tokenizer, dtype=model_args.save_dtype,
                               max_shard_size=model_args.max_shard_size)
    accelerator.end_training()
    if accelerator.is_main_process:
        plot = training.plot_metrics(output_dir)
        seconds = state.train_seconds
        peak = training.peak_flops_per_device(args)
        throughput = state.tokens_seen / seconds if seconds else None
        devices = accelerator.num_processes
        on_gpu = torch.cuda.is_available()
        write_json_atomic(output_dir / "training_report.json", {
            "model": model_args.model_name_or_path,
            "tokenizer": model_args.tokenizer_name,
            "steps": state.step,
            "epochs_completed": state.epoch,
            "tokens_seen": state.tokens_seen,
            "tokens_per_step": args.per_device_train_batch_size * devices * args.gradient_accumulation_steps
            * data_args.block_size,
            "train_wall_seconds": seconds,
            "total_wall_seconds_this_session": time.time() - started,
            "processes": devices,
            "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "gpu_hours": seconds * devices / 3600 if on_gpu else 0.0,
            "tokens_per_second": throughput,
            "tokens_per_second_per_device": throughput / devices if throughput else None,
            "flops_per_token": flops_per_token,
            "flops_formula": "6*N + 12*L*H*Q*T (PaLM; N = matmul parameters, T = block size)",
            "mfu": throughput * flops_per_token / (peak * devices) if throughput and peak else None,
            "parameters": num_parameters,
            "mixed_precision": accelerator.mixed_precision,
            "distributed_type": str(accelerator.distributed_type),
            "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if accelerator.state.deepspeed_plugin else None,
            "eos_appended": True,  # tokenize_and_pack ends every document with EOS (tested)
            "attn_implementation": attention,
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
