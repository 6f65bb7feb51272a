#!/usr/bin/env python
"""Supervised fine-tuning on chat records, under `accelerate launch` (same configs as pretraining).

    accelerate launch --config_file accelerate_configs/cpu_zero3_2proc.yaml scripts/finetune.py \\
        --model_name_or_path offline:smollm2-135m --train_files sample_data/sft/sft_ja.jsonl \\
        --max_train_steps 4 --output_dir outputs/sft

Data: JSONL records `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`
(`toolkit.chat` checks them and names the file and line of a bad one). Each chat is
rendered with the tokenizer's chat template, or a documented default for a base model
without one (`--chat_template`); the loss covers only the assistant answers, each closed
by EOS so the model learns to stop. The template used is saved with the model, so
evaluation renders prompts the same way.

The loop, optimizer groups, schedule, checkpoints, the chunked LM-head loss and the consolidated
save are the ones `pretrain.py` uses (`toolkit.training`, `toolkit.losses`). The loss of a step is
the mean over all its answer tokens, across accumulation steps and processes (transformers'
`num_items_in_batch`), not a mean of per-micro-batch means. The data order is a seeded permutation, so every
base model sees the same examples in the same order with the same hyperparameters — the
point of an ablation. Writes the model, `metrics.jsonl`, `loss_curve.png` and
`finetune_report.json` into --output_dir.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from toolkit import assets
from toolkit.chat import (
    IGNORE_INDEX, answer_characters, chat_template, cut_middle, read_chat_records, require_eos, tokenize_chat,
)
from toolkit.losses import use_fused_loss
from toolkit.reports import write_json_atomic
from toolkit.training import (
    LoopArguments, data_signature, first_step_examples, make_accelerator, make_optimizer, make_scheduler, plot_metrics,
    read_metrics, resume, save_consolidated, train,
)
from toolkit.quiet import quiet_by_default


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(metadata={"help": "Base model: Hub id, folder, or offline: name."})
    train_files: list[str] = field(metadata={"help": "Chat JSONL files (paths or globs)."})
    chat_template: str = field(
        default="auto",
        metadata={"help": "auto: the tokenizer's template, else the default ([INST] format, see toolkit/chat.py); "
                  "default: always the default; or a .jinja file."},
    )
    max_seq_length: int = field(default=1024, metadata={"help": "Cut chats to this many tokens (counted, reported)."})
    save_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the saved weights; float32 keeps a short fine-tune's small updates exactly, "
                  "bfloat16 halves the size (use it for 7B models trained in bf16)."}
    )


def pad_collate(pad_id):
    def collate(examples):
        width = max(len(example["input_ids"]) for example in examples)
        batch = {
            "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
            "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            batch["input_ids"][row, :length] = torch.tensor(example["input_ids"])
            batch["attention_mask"][row, :length] = 1
            batch["labels"][row, :length] = torch.tensor(example["labels"])
        return batch

    return collate


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    script_args, loop_args = HfArgumentParser((FinetuneArguments, LoopArguments)).parse_args_into_dataclasses()
    if not loop_args.output_dir:
        raise ValueError("--output_dir is required")
    started = time.time()
    accelerator = make_accelerator(loop_args, project_name="finetune")
    path = assets.resolve(script_args.model_name_or_path)

    tokenizer = AutoTokenizer.from_pretrained(path)
    require_eos(tokenizer, script_args.model_name_or_path)
    template = chat_template(tokenizer, script_args.chat_template)
    template_source = "tokenizer" if template == tokenizer.chat_template else (
        "default" if script_args.chat_template in ("auto", "default") else script_args.chat_template)
    chats = read_chat_records(script_args.train_files)
    examples, truncated, answers_cut, dropped = [], 0, 0, 0
    for messages in chats:
        full = tokenize_chat(tokenizer, messages, template)
        example = full
        if len(full["input_ids"]) > script_args.max_seq_length:
            example = dict(zip(("input_ids", "labels"),
                               cut_middle(full["input_ids"], full["labels"], script_args.max_seq_length)))
        answer_tokens = sum(label != IGNORE_INDEX for label in example["labels"])
        truncated += len(full["input_ids"]) > script_args.max_seq_length
        answers_cut += answer_tokens < sum(label != IGNORE_INDEX for label in full["labels"])
        if answer_tokens == 0:
            dropped += 1  # only when --max_seq_length cannot even hold the prompt's start
            continue
        examples.append(example)
    if not examples:
        raise ValueError(f"{script_args.train_files}: no chat keeps any answer token within --max_seq_length "
                         f"{script_args.max_seq_length}; raise it")
    accelerator.print(f"{len(examples)} chats ({truncated} cut in the prompt's middle to {script_args.max_seq_length} "
                      f"tokens, {answers_cut} with a cut answer, {dropped} dropped); chat template: {template_source}")

    # bf16 weights under a bf16 config (7B: half the CPU memory per process), else float32
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    if loop_args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    per_step = loop_args.per_device_train_batch_size * accelerator.num_processes * loop_args.gradient_accumulation_steps
    steps_per_epoch = len(examples) // per_step
    num_training_steps = loop_args.max_train_steps or steps_per_epoch * loop_args.num_train_epochs
    if num_training_steps < 1:
        raise ValueError(f"{len(examples)} chats make no full optimizer step of {per_step}; add data or lower the batch")
    optimizer = make_optimizer(model, loop_args)
    scheduler = make_scheduler(optimizer, loop_args, num_training_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    use_fused_loss(accelerator.unwrap_model(model), "chunked")
    accelerator.register_for_checkpointing(scheduler)
    state = resume(accelerator, loop_args, data_signature(accelerator, loop_args, {
        "examples": len(examples), "tokens": sum(len(e["input_ids"]) for e in examples)}))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    state = train(accelerator, model, optimizer, scheduler, examples, pad_collate(pad_id), loop_args, state,
                  num_training_steps)

    tokenizer.chat_template = template  # evaluation renders prompts exactly as fine-tuning did
    accelerator.unwrap_model(model).config.use_cache = True  # off in training only
    save_consolidated(accelerator, model, loop_args.output_dir, tokenizer=tokenizer, dtype=script_args.save_dtype)
    if accelerator.is_main_process:
        records = [record for record in read_metrics(loop_args.output_dir) if "loss" in record]
        losses = [record["loss"] for record in records]
        # answer tokens and characters of every example, once; the first step's are a subset: its own
        # answers (not the set's average: a batch of a few chats can be far from it), used when the
        # first record is step 1 alone (--logging_steps 1)
        tokens_of = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples]
        characters_of = [answer_characters(tokenizer, e["labels"]) for e in examples]
        first_step = first_step_examples(len(examples), loop_args, accelerator.num_processes)
        first_tokens = sum(tokens_of[i] for i in first_step)
        first_characters = sum(characters_of[i] for i in first_step)
        plot_metrics(loop_args.output_dir)
        write_json_atomic(Path(loop_args.output_dir) / "finetune_report.json", {
            "model": script_args.model_name_or_path,
            "train_files": script_args.train_files,
            "chat_template_source": template_source,
            "chats": len(chats), "examples": len(examples), "truncated": truncated,
            "answers_cut": answers_cut, "dropped_no_answer_left": dropped,
            "tokens": sum(len(e["input_ids"]) for e in examples),
            "answer_tokens": sum(tokens_of),
            "answer_characters": sum(characters_of),
            "steps": state.step, "epochs_started": state.epoch + 1, "processes": accelerator.num_processes,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            # nats per answer token depend on the tokenizer (an extended tokenizer's token holds ~2x the
            # characters, so its loss per token is ~2x at equal quality); per character the arms compare.
            # The first loss is converted at the first step's own answers (first_step_examples).
            "first_loss_per_character": losses[0] * first_tokens / first_characters
            if losses and records[0]["step"] == 1 and first_characters else None,
            "first_step_answer_tokens": first_tokens, "first_step_answer_characters": first_characters,
            "train_seconds": state.train_seconds, "total_seconds": time.time() - started,
            "arguments": {**asdict(script_args), **asdict(loop_args)},
        })
    accelerator.end_training()


if __name__ == "__main__":
    main()
