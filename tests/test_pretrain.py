"""scripts/pretrain.py: inputs checked before compute, EOS-terminated packed data, and the real
thing under `accelerate launch` with 2-process CPU ZeRO-3: loss falls, the saved model loads with
the extended vocabulary, and SIGKILL + `--resume_from_checkpoint latest` repeats the same losses."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import pretrain
from extended_tokenizers import WORDS, extend_with_merges
from toolkit.training import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "accelerate_configs"


@pytest.fixture(scope="module")
def extended_tokenizer(tiny_mistral_path, tmp_path_factory):
    return str(extend_with_merges(tiny_mistral_path, WORDS, tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def corpus(sample_data, tmp_path_factory):
    import gzip

    lines = []
    for language, count in (("ja", 24), ("en", 4)):
        with gzip.open(sample_data / f"pool/data/{language}/{language}_clean_0000.jsonl.gz", "rt") as stream:
            lines += [next(stream) for _ in range(count)]
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def run_main(monkeypatch, *arguments):
    monkeypatch.setattr(sys, "argv", ["pretrain.py", *map(str, arguments)])
    pretrain.main()


def common(model, tokenizer, corpus, output_dir, block_size=64):
    return ["--model_name_or_path", model, "--tokenizer_name", tokenizer, "--train_files", corpus,
            "--block_size", block_size, "--output_dir", output_dir, "--report_to", "none"]


# --------------------------------------------------------------------------- bad input, before compute


@pytest.mark.parametrize("case, message", [
    ("missing_model", "cannot load the model config"),
    ("missing_tokenizer", "cannot load the --tokenizer_name"),
    ("not_an_extension", "not an extension"),
    ("block_too_long", "beyond the 4096-token context"),
    ("missing_corpus", "no such file"),
])
def test_bad_inputs_fail_before_compute(case, message, monkeypatch, tmp_path, tiny_mistral_path,
                                        smollm2_path, extended_tokenizer, corpus):
    model, tokenizer, block, train = tiny_mistral_path, extended_tokenizer, 64, corpus
    if case == "missing_model":
        model = str(tmp_path / "no-model")
    elif case == "missing_tokenizer":
        tokenizer = str(tmp_path / "no-tokenizer")
    elif case == "not_an_extension":
        tokenizer = smollm2_path
    elif case == "block_too_long":
        block = 8192
    elif case == "missing_corpus":
        train = str(tmp_path / "missing.jsonl")
    monkeypatch.setattr(pretrain.training, "make_accelerator", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(SystemExit, match=message):
        run_main(monkeypatch, *common(model, tokenizer, train, tmp_path / "out", block))


@pytest.mark.parametrize("content, message", [
    ('{"text": ""}\n{"text": "   "}\n', "no non-empty document"),
    ('{"text": "短い。"}\n', "fewer than one block"),
    ('{"text": "ok"}\n{"txt": "oops"}\n', r"train.jsonl:2: no 'text' field"),
])
def test_empty_or_bad_corpus_is_refused(content, message, monkeypatch, tmp_path, tiny_mistral_path,
                                        extended_tokenizer):
    train = tmp_path / "train.jsonl"
    train.write_text(content, encoding="utf-8")
    monkeypatch.setattr(pretrain.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("model loaded before the corpus was checked"))
    with pytest.raises(SystemExit, match=message):
        run_main(monkeypatch, *common(tiny_mistral_path, extended_tokenizer, train, tmp_path / "out"))


def test_every_document_ends_with_eos(tmp_path, extended_tokenizer):
    from accelerate import PartialState

    texts = ["日本語の設定ファイル。" * 3, "An English sentence.", "コマンドをインストールする。"]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(extended_tokenizer)
    data_args = pretrain.DataArguments(train_files=[str(train)], block_size=8)
    blocks, stats = pretrain.tokenize_and_pack([str(train)], tokenizer, data_args, PartialState())
    expected = [token for text in texts for token in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    packed = [int(token) for block in blocks["input_ids"] for token in block]
    assert stats["documents"] == 3 and stats["document_tokens"] == len(expected)
    assert all(len(block) == 8 for block in blocks["input_ids"])
    assert packed == expected[: len(expected) // 8 * 8]
    assert packed.count(tokenizer.eos_token_id) >= 2  # the model sees where documents stop


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    expected = {"zero3.yaml": 8, "zero3_16gpu.yaml": 16, "zero3_multinode.yaml": 16, "zero3_offload.yaml": 8,
                "cpu_zero3_2proc.yaml": 2}
    for name, processes in expected.items():
        config = ClusterConfig.from_yaml_file(CONFIGS / name)
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 3, name
        assert config.num_processes == processes, name
        assert config.deepspeed_config["zero3_save_16bit_model"] is True, name
        assert (config.mixed_precision == "no") == (name == "cpu_zero3_2proc.yaml"), name
    raw = yaml.safe_load((CONFIGS / "zero3_multinode.yaml").read_text())
    assert raw["num_machines"] == 2 and raw["main_process_ip"] and raw["machine_rank"] == 0
    assert yaml.safe_load((CONFIGS / "zero3_offload.yaml").read_text())["deepspeed_config"]["offload_optimizer_device"] == "cpu"


# --------------------------------------------------------------------------- accelerate launch, ZeRO-3 on CPU


def launch_command(tiny_mistral_path, tokenizer, corpus, output_dir, *extra):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--config_file", str(CONFIGS / "cpu_zero3_2proc.yaml"), "scripts/pretrain.py",
            *map(str, common(tiny_mistral_path, tokenizer, corpus, output_dir)), *map(str, extra),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_train_steps", "8",
            "--learning_rate", "3e-3", "--checkpointing_steps", "4", "--save_dtype", "float32"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def kill_tree(process):
    """SIGKILL the launcher and every worker it started (torch's launcher may regroup them)."""
    import psutil

    launcher = psutil.Process(process.pid)
    workers = launcher.children(recursive=True)
    for victim in workers + [launcher]:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(workers, timeout=10)


@pytest.mark.slow
def test_zero3_training_and_exact_resume(tmp_path, tiny_mistral_path, extended_tokenizer, corpus, sample_data):
    # 1. an uninterrupted run
    straight = tmp_path / "straight"
    evaluation = ["--eval_files_ja", sample_data / "eval/ja_eval.jsonl.gz",
                  "--eval_files_en", sample_data / "eval/en_eval.jsonl.gz", "--max_eval_documents", "1"]
    subprocess.run(launch_command(tiny_mistral_path, extended_tokenizer, corpus, straight, *evaluation),
                   cwd=REPO_ROOT, env=ENV, check=True, timeout=300, capture_output=True)
    losses = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.1, losses

    report = json.loads((straight / "training_report.json").read_text())
    assert report["steps"] == 8 and report["tokens_seen"] == 8 * 2 * 2 * 2 * 64
    assert report["zero_stage"] == 3 and report["eos_appended"] is True  # the model card states both
    assert report["final_eval"]["eval_ja_bits_per_character"] < report["eval_at_start"]["eval_ja_bits_per_character"]
    tokenizer = AutoTokenizer.from_pretrained(straight)
    model = AutoModelForCausalLM.from_pretrained(straight)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(extended_tokenizer))
    assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == math.ceil(len(tokenizer) / 64) * 64
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert (straight / "model.safetensors").exists() or (straight / "model.safetensors.index.json").exists()
    assert (straight / "loss_curve.png").stat().st_size > 0

    # 2. the same run, SIGKILLed after its step-4 checkpoint, then resumed
    resumed = tmp_path / "resumed"
    command = launch_command(tiny_mistral_path, extended_tokenizer, corpus, resumed)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (resumed / "checkpoints" / "step_00000004").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    kill_tree(process)
    assert not (resumed / "training_report.json").exists(), "the run finished before it could be killed"
    subprocess.run(command + ["--resume_from_checkpoint", "latest"], cwd=REPO_ROOT, env=ENV, check=True,
                   timeout=300, capture_output=True)
    resumed_report = json.loads((resumed / "training_report.json").read_text())
    assert resumed_report["resumed_from"].endswith("step_00000004")
    resumed_losses = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert sorted(resumed_losses) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-6, abs=1e-6), step
    assert resumed_report["tokens_seen"] == report["tokens_seen"]


# --------------------------------------------------------------------------- shared training blocks


def test_param_groups_and_frozen_body(tiny_mistral_path, tmp_path):
    from toolkit import training

    args = training.LoopArguments(output_dir=str(tmp_path), learning_rate=1e-3, embedding_learning_rate=5e-3,
                                  freeze_non_embedding_steps=2, num_warmup_steps=0, report_to="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32)
    optimizer = training.make_optimizer(model, args)
    groups = {group["name"]: group for group in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0.0
    assert {names[id(p)] for p in groups["embedding"]["params"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    scheduler = training.make_scheduler(optimizer, args, num_training_steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = torch.randint(0, 32000, (2, 16))
    for step in range(3):
        rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
        assert (rates["decay"] == 0.0) == (step < 2) and rates["embedding"] > 0
        assert rates["embedding"] == pytest.approx(5 * (rates["decay"] or rates["embedding"] / 5))
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step == 1:  # two frozen steps: only the embeddings moved
            moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
            assert moved == {"model.embed_tokens.weight", "lm_head.weight"}
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])


def test_sampler_resumes_mid_epoch_and_shards():
    from toolkit.training import ShardedEpochSampler

    full = [list(ShardedEpochSampler(20, 2, seed=1, epoch=0, rank=r, world_size=2)) for r in range(2)]
    assert sorted(full[0] + full[1]) == sorted(set(full[0] + full[1])) and len(full[0]) == 10
    later = list(ShardedEpochSampler(20, 2, seed=1, epoch=0, rank=1, world_size=2, start_batch=3))
    assert later == full[1][6:]
    assert list(ShardedEpochSampler(20, 2, seed=1, epoch=1, rank=0, world_size=2)) != full[0]


def test_count_windows_matches_text_nll(tiny_mistral_path):
    from toolkit.metrics import count_windows, text_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for length, window in [(2, 8), (8, 8), (9, 8), (40, 8), (41, 16), (100, 10)]:
        calls.clear()
        text_nll(model, list(range(3, 3 + length)), max_length=window)
        assert count_windows(length, max_length=window) == len(calls), (length, window)
