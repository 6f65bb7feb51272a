import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from toolkit.chat import (
    DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, ChatFormatError, answer_characters, chat_template, read_chat_records,
    require_eos, tokenize_chat,
)

REPO = Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "system", "content": "短く答える。"},
    {"role": "user", "content": "apt とは何ですか?"},
    {"role": "assistant", "content": "パッケージ管理ツールです。"},
    {"role": "user", "content": "もう一つ"},
    {"role": "assistant", "content": "dpkg の上で動きます"},
]
# A template that does not close answers with EOS: tokenize_chat must add it.
OPEN_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def labelled_runs(example):
    """The runs of consecutive labelled tokens, as token lists."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("asset, template", [("smollm2_path", "auto"), ("mistral_tokenizer_path", "auto"),
                                             ("smollm2_path", "open")])
def test_loss_covers_exactly_each_answer_and_its_eos(asset, template, request):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(asset))
    chosen = OPEN_TEMPLATE if template == "open" else chat_template(tokenizer)
    if asset == "mistral_tokenizer_path":
        assert chosen == DEFAULT_CHAT_TEMPLATE  # the Mistral base has no template of its own
    example = tokenize_chat(tokenizer, CHAT, chosen)
    runs = labelled_runs(example)
    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(run[:-1]).strip() == answer
    # Everything else (system, user turns, role markers) is masked.
    masked = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
    assert "apt とは何ですか?" in tokenizer.decode(masked) and "短く答える。" in tokenizer.decode(masked)
    assert sum(len(run) for run in runs) == sum(label != IGNORE_INDEX for label in example["labels"])


def test_long_chats_lose_the_middle_of_the_prompt_not_the_answer(mistral_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(mistral_tokenizer_path)
    chat = [{"role": "user", "content": "次の文章の続きを一文書いてください。" + "長い本文です。" * 60},
            {"role": "assistant", "content": "これが答えです。"}]
    full = tokenize_chat(tokenizer, chat, DEFAULT_CHAT_TEMPLATE)
    cut = tokenize_chat(tokenizer, chat, DEFAULT_CHAT_TEMPLATE, max_length=64)
    assert len(full["input_ids"]) > 64 and len(cut["input_ids"]) == 64
    assert cut["input_ids"][:16] == full["input_ids"][:16]  # BOS, [INST] and the instruction stay
    assert cut["input_ids"][16:] == full["input_ids"][-48:] and cut["labels"][16:] == full["labels"][-48:]
    assert tokenizer.decode(labelled_runs(cut)[0][:-1]) == "これが答えです。"
    # answers longer than the budget: cut at the end
    tiny = tokenize_chat(tokenizer, chat, DEFAULT_CHAT_TEMPLATE, max_length=4)
    assert tiny["input_ids"] == full["input_ids"][:4]


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "q"}]}', r":2: the last message must be the assistant's answer"),
    ('{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}', r":2: message 0 has role 'robot'"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}', r":2: message 0 \(user\) has empty"),
    ('{"text": "no messages"}', r":2: a JSON object with a 'messages' list is expected"),
    ('{"messages": [', r":2: malformed JSON"),
    ('{"messages": "hello"}', r":2: 'messages' must be a non-empty list"),
])
def test_malformed_chat_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ChatFormatError, match=str(path) + message):
        read_chat_records([path])


def test_empty_chat_file_and_bundled_set(tmp_path, sample_data):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ChatFormatError, match="empty.jsonl: the file is empty"):
        read_chat_records([tmp_path / "empty.jsonl"])
    assert len(read_chat_records([sample_data / "sft" / "sft_ja.jsonl"])) == 360


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, OPEN_TEMPLATE])
def test_answer_characters_are_the_answers_text_whatever_the_tokenizer(tiny_mistral_path, template):
    """The per-character fine-tuning loss divides by these: the answers' own characters (at most a
    separator more per answer), EOS counting none, for the base and for an extended tokenizer."""
    answers = "".join(m["content"] for m in CHAT if m["role"] == "assistant")
    base = AutoTokenizer.from_pretrained(tiny_mistral_path)
    extended = AutoTokenizer.from_pretrained(tiny_mistral_path)
    extended.add_tokens(["パッケージ", "管理", "ツール"])
    counts = []
    for tokenizer in (base, extended):
        labels = tokenize_chat(tokenizer, CHAT, template)["labels"]
        counts.append(answer_characters(tokenizer, labels))
        assert len(answers) <= counts[-1] <= len(answers) + 2
    assert len(tokenize_chat(extended, CHAT, template)["labels"]) < len(tokenize_chat(base, CHAT, template)["labels"])
    assert answer_characters(base, [IGNORE_INDEX] * 3) == 0


def test_first_step_examples_are_what_the_first_optimizer_step_reads():
    """The per-character first loss converts at these examples' own answers: each process's first
    accumulation window of epoch 0, read through the DataLoader exactly as training.train builds it."""
    from torch.utils.data import DataLoader

    from toolkit.training import LoopArguments, ShardedEpochSampler, first_step_examples

    args = LoopArguments(output_dir="unused", per_device_train_batch_size=2, gradient_accumulation_steps=3, seed=5)
    expected = []
    for rank in range(2):
        loader = DataLoader(list(range(50)), batch_size=2, drop_last=True,
                            sampler=ShardedEpochSampler(50, 2, args.seed, 0, rank, 2))
        expected += [int(i) for batch in list(loader)[:3] for i in batch]
    assert first_step_examples(50, args, world_size=2) == expected
    assert len(set(expected)) == 12
    assert first_step_examples(50, LoopArguments(output_dir="unused", per_device_train_batch_size=2,
                                                 gradient_accumulation_steps=3, seed=6), 2) != expected


def test_tokenizer_without_eos_is_refused(tiny_mistral_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="my-base: the tokenizer has no EOS token"):
        require_eos(tokenizer, "my-base")
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_chat(tokenizer, CHAT, DEFAULT_CHAT_TEMPLATE)


@pytest.mark.slow
def test_finetune_under_accelerate_launch_with_two_cpu_processes(tmp_path, tiny_mistral_path):
    output = tmp_path / "sft"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_zero3_2proc.yaml",
        "scripts/finetune.py", "--model_name_or_path", "offline:tiny-mistral",
        "--train_files", "sample_data/sft/sft_ja.jsonl", "--max_train_steps", "2", "--per_device_train_batch_size", "2",
        "--max_seq_length", "128", "--learning_rate", "1e-3", "--report_to", "none", "--output_dir", str(output),
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads((output / "finetune_report.json").read_text())
    assert report["steps"] == 2 and report["processes"] == 2 and report["chat_template_source"] == "default"
    assert report["chats"] == 360 and report["examples"] + report["dropped_no_answer_left"] == 360
    assert 0 < report["answer_tokens"] < report["tokens"]
    assert report["answer_characters"] > 0
    assert 0 < report["first_step_answer_tokens"] < report["answer_tokens"]
    assert report["first_loss_per_character"] == pytest.approx(
        report["first_loss"] * report["first_step_answer_tokens"] / report["first_step_answer_characters"])
    # the saved model is the trained one (full weights gathered from ZeRO-3), with the template it learned
    trained = load_file(output / "model.safetensors")
    initial = load_file(Path(tiny_mistral_path) / "model.safetensors")
    assert trained.keys() == initial.keys()
    assert trained["model.embed_tokens.weight"].shape == initial["model.embed_tokens.weight"].shape
    assert any(not (trained[k] == initial[k]).all() for k in trained)
    assert AutoTokenizer.from_pretrained(output).chat_template == DEFAULT_CHAT_TEMPLATE
    assert (output / "loss_curve.png").stat().st_size > 0


def test_a_step_weighs_every_answer_token_equally_across_accumulation(tmp_path, tiny_mistral_path):
    """Micro-batches with 3 and 30 answer tokens: the step's gradient is that of the mean over all 33
    tokens (transformers' num_items_in_batch), not the mean of the two micro-batch means."""
    import torch
    from transformers import AutoModelForCausalLM

    import finetune
    from toolkit import training
    from toolkit.losses import use_fused_loss

    args = training.LoopArguments(output_dir=str(tmp_path), per_device_train_batch_size=1,
                                  gradient_accumulation_steps=2, max_grad_norm=1e9, report_to="none", seed=0)
    accelerator = training.make_accelerator(args)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for answer in (3, 30):
        ids = torch.randint(3, 32000, (40,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (40 - answer) + ids[40 - answer:]})
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float64)
    use_fused_loss(model, "chunked")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    training.train(accelerator, model, optimizer, scheduler, examples, finetune.pad_collate(0), args,
                   training.TrainState(), num_training_steps=1)
    batch = finetune.pad_collate(0)(examples)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                      ignore_index=IGNORE_INDEX).backward()  # mean over all 33 answer tokens
    for (name, trained), initial in zip(model.named_parameters(), reference.parameters()):
        expected = initial.detach() - initial.grad
        assert torch.allclose(trained.detach(), expected, atol=1e-9), name
