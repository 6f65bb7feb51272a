"""scripts/pretrain.py: inputs checked before compute, token shards read in blocks with per-document
attention, and the real thing under `accelerate launch` with 2-process CPU ZeRO-3: loss falls, the saved
model loads with the extended vocabulary, and SIGKILL + `--resume_from_checkpoint latest` repeats the
same losses (and refuses a changed world size)."""

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
from toolkit.embeddings import DATA_INITS
from toolkit.token_shards import tokenize_locally
from toolkit.training import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "accelerate_configs"


@pytest.fixture(scope="module")
def extended_tokenizer(tiny_mistral_path, tmp_path_factory):
    return str(extend_with_merges(tiny_mistral_path, WORDS, tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def corpus(sample_data, tmp_path_factory, extended_tokenizer):
    """Token shards of 24 JA + 4 EN documents for the extended tokenizer (the mix stage's output)."""
    import gzip

    lines = []
    for language, count in (("ja", 24), ("en", 4)):
        with gzip.open(sample_data / f"pool/data/{language}/{language}_clean_0000.jsonl.gz", "rt") as stream:
            lines += [next(stream) for _ in range(count)]
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    tokenize_locally([folder / "train.jsonl"], extended_tokenizer, folder / "tokens")
    return str(folder / "tokens")


def run_main(monkeypatch, *arguments):
    monkeypatch.setattr(sys, "argv", ["pretrain.py", *map(str, arguments)])
    pretrain.main()


def common(model, tokenizer, corpus, output_dir, block_size=64):
    return ["--model_name_or_path", model, "--tokenizer_name", tokenizer, "--train_token_dir", corpus,
            "--block_size", block_size, "--output_dir", output_dir, "--report_to", "none"]


# --------------------------------------------------------------------------- bad input, before compute


@pytest.mark.parametrize("case, message", [
    ("missing_model", "cannot load the model config"),
    ("missing_tokenizer", "cannot load the --tokenizer_name"),
    ("not_an_extension", "not an extension"),
    ("block_too_long", "beyond the 4096-token context"),
    ("missing_corpus", "no token-shard manifest"),
    ("other_tokenizer", "tokenised with"),
    ("block_over_shards", "fewer than one block"),
    ("liger_without_gpu", "needs a CUDA GPU"),
    ("zero_new_rows_multiplier", "--new_embeddings_lr_multiplier must be a positive number, not 0.0"),
    ("negative_new_rows_multiplier", "--new_embeddings_lr_multiplier must be a positive number, not -2.0"),
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
        train = str(tmp_path / "missing")
    elif case == "other_tokenizer":
        tokenize_locally([Path(corpus).parent / "train.jsonl"], tiny_mistral_path, tmp_path / "base-tokens")
        train = str(tmp_path / "base-tokens")
    elif case == "block_over_shards":
        (tmp_path / "short.jsonl").write_text('{"text": "短い。"}\n', encoding="utf-8")
        tokenize_locally([tmp_path / "short.jsonl"], tokenizer, tmp_path / "short-tokens")
        train = str(tmp_path / "short-tokens")
    extra = {"liger_without_gpu": ["--use_liger_kernel"],
             "zero_new_rows_multiplier": ["--new_embeddings_lr_multiplier", "0"],
             "negative_new_rows_multiplier": ["--new_embeddings_lr_multiplier", "-2"]}.get(case, [])
    monkeypatch.setattr(pretrain.training, "make_accelerator", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(SystemExit, match=message):
        run_main(monkeypatch, *common(model, tokenizer, train, tmp_path / "out", block), *extra)


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


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_new_rows_multiplier_under_two_process_zero3(precision, tmp_path, tiny_mistral_path, extended_tokenizer,
                                                     corpus):
    """--new_embeddings_lr_multiplier 4 on 2-process CPU ZeRO-3, one optimizer step of 2 accumulated micro-batches,
    against the same run with 1 and a run with learning rate 0 (the start): the new rows moved exactly 4 times as
    far, in both matrices, and everything else is bit-identical. The embeddings are padded so that the two
    processes' partitions meet among the new tokens' rows: each process scales its own share."""
    base_rows = len(AutoTokenizer.from_pretrained(tiny_mistral_path))
    vocabulary = len(AutoTokenizer.from_pretrained(extended_tokenizer))
    half = base_rows + (vocabulary - base_rows) // 2  # rows padded to 2 x half: partition 1 starts at row `half`
    assert base_rows < half < vocabulary, "the partition boundary must fall among the new tokens' rows"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    saved = {}
    for name, extra in (("start", ["--learning_rate", "0", "--new_embeddings_lr_multiplier", "1"]),
                        ("k1", ["--new_embeddings_lr_multiplier", "1"]),
                        ("k4", [])):  # 4 is the default
        output = tmp_path / name
        command = [accelerate, "launch", "--config_file", str(CONFIGS / "cpu_zero3_2proc.yaml"),
                   "--mixed_precision", precision, "scripts/pretrain.py",
                   *map(str, common(tiny_mistral_path, extended_tokenizer, corpus, output)),
                   "--embedding_init", "subword_mean", "--pad_to_multiple_of", str(half),
                   "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                   "--max_train_steps", "1", "--num_warmup_steps", "0", "--learning_rate", "3e-3", *extra,
                   "--save_dtype", "float32"]
        result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, timeout=400, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        report = json.loads((output / "training_report.json").read_text())
        assert report["steps"] == 1 and report["zero_stage"] == 3 and report["processes"] == 2
        assert report["new_embeddings_lr_multiplier"] == (4 if name == "k4" else 1)
        saved[name] = {key: value.detach() for key, value in
                       AutoModelForCausalLM.from_pretrained(output).named_parameters()}
    start, plain, scaled = saved["start"], saved["k1"], saved["k4"]
    embeddings = {"model.embed_tokens.weight", "lm_head.weight"}
    assert start["lm_head.weight"].shape[0] == 2 * half
    for name in start:
        if name not in embeddings:
            assert torch.equal(scaled[name], plain[name]), name
            assert not torch.equal(plain[name], start[name]), name  # the body trained
            continue
        assert torch.equal(scaled[name][:base_rows], plain[name][:base_rows]), name
        step = plain[name][base_rows:] - start[name][base_rows:]
        scaled_step = scaled[name][base_rows:] - start[name][base_rows:]
        # bf16: the saved weights are the bf16 copy the forward pass uses (the fp32 master is scaled exactly);
        # each element is off by a rounding at most, where an unscaled copy would be off by 3 steps (~1e-2)
        tolerance = {"no": dict(rtol=1e-4, atol=1e-6), "bf16": dict(rtol=0, atol=1e-3)}[precision]
        torch.testing.assert_close(scaled_step, 4 * step, **tolerance)
        assert float(scaled_step.norm() / step.norm()) == pytest.approx(4, rel=1e-3 if precision == "bf16" else 1e-6)
    moved = (plain["lm_head.weight"] - start["lm_head.weight"]).abs().amax(dim=1) > 0
    assert moved[base_rows:half].all() and moved[half:vocabulary].all()  # new rows on both processes moved


# --------------------------------------------------------------------------- shared training blocks


def test_param_groups_and_new_embeddings_only_stage(tiny_mistral_path, tmp_path):
    from toolkit import training
    from toolkit.embeddings import NewEmbeddingsOnlyStage

    args = training.LoopArguments(output_dir=str(tmp_path), learning_rate=1e-3, embedding_learning_rate=5e-3,
                                  train_new_embeddings_only_steps=2, num_warmup_steps=2, report_to="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32)
    first_new = 31000  # pretend ids >= 31000 are the extension's
    stage = NewEmbeddingsOnlyStage(model, first_new_row=first_new, steps=2)
    optimizer = training.make_optimizer(model, args)
    groups = {group["name"]: group for group in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0.0
    assert {names[id(p)] for p in groups["embedding"]["params"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert groups["embedding"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    scheduler = training.make_scheduler(optimizer, args, num_training_steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = torch.cat([torch.randint(3, first_new, (2, 8)), torch.randint(first_new, 32000, (2, 8))], dim=1)
    embedding_names = {"model.embed_tokens.weight", "lm_head.weight"}
    for step in range(3):
        stage(step)
        rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
        assert (rates["decay"] == 0.0) == (step < 2) and (rates["embedding"] > 0) == (step > 0)  # warmup from 0
        if step == 2:  # the body's own warmup after the stage: half of the schedule at its first step
            assert rates["decay"] == pytest.approx(0.5 * rates["embedding"] / 5)
        model(input_ids=batch, labels=batch).loss.backward()
        body_grads = [p.grad for n, p in model.named_parameters() if n not in embedding_names]
        assert all(g is None for g in body_grads) == (step < 2)  # frozen: no weight gradients computed
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step == 1:  # two stage steps: only new embedding rows moved
            moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
            assert moved == embedding_names
            for name in embedding_names:
                weight = dict(model.named_parameters())[name]
                assert torch.equal(weight[:first_new], before[name][:first_new]), name
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])


def run_loop(output_dir, multiplier, steps, schedule_steps, resume=False):
    """toolkit.training.train on a tiny tied Llama (ids >= 96 new), as pretrain.py wires it: batches of 2,
    2 micro-batches per step, a checkpoint every step, a schedule of `schedule_steps`, stopped after `steps`;
    the final parameters."""
    from torch.utils.data import default_collate
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolkit import training
    from toolkit.embeddings import NewRowsLearningRate

    args = training.LoopArguments(output_dir=str(output_dir), per_device_train_batch_size=2,
                                  gradient_accumulation_steps=2, learning_rate=1e-2, num_warmup_steps=0,
                                  checkpointing_steps=1, resume_from_checkpoint="latest" if resume else None,
                                  report_to="none")
    accelerator = training.make_accelerator(args)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    optimizer = training.make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = training.make_scheduler(optimizer, args, num_training_steps=schedule_steps)
    accelerator.register_for_checkpointing(scheduler)
    new_rows = NewRowsLearningRate(accelerator.unwrap_model(model), first_new_row=96, multiplier=multiplier)
    state = training.resume(accelerator, args)
    ids = torch.arange(8 * 12).remainder(128).view(8, 12).flip(0)  # every id, the new ones among them
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    training.train(accelerator, model, optimizer, scheduler, dataset, default_collate, args, state, steps,
                   before_step=new_rows.remember, after_step=new_rows.apply)
    return {name: parameter.detach().clone() for name, parameter in accelerator.unwrap_model(model).named_parameters()}


def test_new_rows_multiplier_in_the_loop_with_accumulation_and_resume(tmp_path):
    """In training.train with 2 accumulated micro-batches per step: one step scales the new rows' update by k
    exactly once (not per micro-batch); a run killed after its step-1 checkpoint and resumed ends bit-identical
    to the straight run, so the resumed steps are scaled too."""
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    start = dict(LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                              tie_word_embeddings=True)).named_parameters())
    plain = run_loop(tmp_path / "k1", 1, steps=1, schedule_steps=3)
    scaled = run_loop(tmp_path / "k4", 4, steps=1, schedule_steps=3)
    name = "model.embed_tokens.weight"
    assert torch.equal(scaled[name][:96], plain[name][:96])
    torch.testing.assert_close(scaled[name][96:] - start[name][96:], 4 * (plain[name][96:] - start[name][96:]),
                               rtol=1e-5, atol=1e-7)
    assert all(torch.equal(scaled[n], plain[n]) for n in plain if n != name)

    straight = run_loop(tmp_path / "straight", 4, steps=3, schedule_steps=3)
    run_loop(tmp_path / "resumed", 4, steps=1, schedule_steps=3)  # stops after step 1 and its checkpoint
    resumed = run_loop(tmp_path / "resumed", 4, steps=3, schedule_steps=3, resume=True)
    assert not torch.equal(straight[name], scaled[name])
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


@pytest.mark.parametrize("kind", ["cosine_with_min_lr", "warmup_stable_decay"])
def test_schedulers_that_need_their_own_arguments(kind, tiny_mistral_path, tmp_path):
    from toolkit import training

    args = training.LoopArguments(output_dir=str(tmp_path), learning_rate=1e-3, lr_scheduler_type=kind,
                                  num_warmup_steps=1, report_to="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32)
    optimizer = training.make_optimizer(model, args)
    scheduler = training.make_scheduler(optimizer, args, num_training_steps=20)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(1e-3)
    if kind == "cosine_with_min_lr":
        assert rates[-1] >= 1e-4 * 0.99  # min_lr_rate 0.1 by default
    else:
        assert rates[10] == pytest.approx(1e-3) and rates[-1] < rates[17] == pytest.approx(1e-3)  # last 10% decay


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA GeForce GTX 1080", None),
])
def test_device_peaks_match_full_names(name, peak, tmp_path):
    from toolkit import training

    found, source = training.device_peak_flops(training.LoopArguments(output_dir=str(tmp_path)), name)
    assert found == peak, source
    assert name in source


def test_sliding_window_is_off_for_training_when_the_block_fits(tiny_mistral_path, monkeypatch):
    import transformers.models.mistral.modeling_mistral as mistral

    config = AutoModelForCausalLM.from_pretrained(tiny_mistral_path).config
    assert pretrain.sliding_window_for_training(config, 4096) is None
    assert pretrain.sliding_window_for_training(config, 8192) == 4096
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32)
    ids = torch.randint(3, 32000, (1, 32))
    windowed = model(input_ids=ids).logits
    calls = []
    original = mistral.create_sliding_window_causal_mask
    monkeypatch.setattr(mistral, "create_sliding_window_causal_mask", lambda *a, **k: calls.append(1) or original(*a, **k))
    model(input_ids=ids)
    assert calls, "the window builds its own mask"
    calls.clear()
    model.config.sliding_window = pretrain.sliding_window_for_training(model.config, 32)
    plain = model(input_ids=ids).logits
    assert not calls and torch.allclose(windowed, plain, atol=1e-6)  # the same maths, no window mask


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


def test_resume_refuses_a_changed_world_size(tmp_path):
    from toolkit import training

    args = training.LoopArguments(output_dir=str(tmp_path), resume_from_checkpoint="latest", report_to="none")
    checkpoint = tmp_path / "checkpoints" / "step_00000004"
    checkpoint.mkdir(parents=True)
    saved = {"data_fingerprint": {"tokens": 100}, "world_size": 2, "per_device_train_batch_size": 2,
             "gradient_accumulation_steps": 1, "seed": 42}
    (checkpoint / training.STATE_FILE).write_text(json.dumps({"step": 4, "data_signature": saved}))

    class Accelerator:
        num_processes = 4

        def load_state(self, path):
            pytest.fail("state loaded despite the changed world size")

        def print(self, *args):
            pass

    now = training.data_signature(Accelerator(), args, {"tokens": 100})
    with pytest.raises(ValueError, match=r"world_size was 2, now 4"):
        training.resume(Accelerator(), args, now)
    with pytest.raises(ValueError, match=r"data_fingerprint was \{'tokens': 100\}, now \{'tokens': 99\}"):
        training.resume(Accelerator(), args, {**saved, "data_fingerprint": {"tokens": 99}})


@pytest.mark.slow
def test_two_machines_on_localhost_with_zero3_init(tmp_path, tiny_mistral_path, extended_tokenizer, corpus):
    """The multi-node config as two "machines" (two `accelerate launch`, --machine_rank 0 and 1) on
    127.0.0.1 over gloo, loading under zero3_init_flag true; a few steps, then a resume."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    output = tmp_path / "multinode"
    config = yaml.safe_load((CONFIGS / "zero3_multinode.yaml").read_text())
    assert config["deepspeed_config"]["zero3_init_flag"] is True
    config.update(use_cpu=True, mixed_precision="no", main_process_ip="127.0.0.1", main_process_port=port,
                  num_processes=2)  # the shipped multi-node config, on CPUs
    config_file = tmp_path / "multinode_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))

    def machines(steps, *extra):
        processes = []
        for rank in (0, 1):
            command = [accelerate, "launch", "--config_file", str(config_file), "--machine_rank", str(rank),
                       "scripts/pretrain.py", *map(str, common(tiny_mistral_path, extended_tokenizer, corpus, output)),
                       "--per_device_train_batch_size", "2", "--max_train_steps", str(steps),
                       "--learning_rate", "3e-3", "--checkpointing_steps", "2", "--save_dtype", "float32", *extra]
            processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
        outputs = [process.communicate(timeout=400)[0] for process in processes]
        for process, text in zip(processes, outputs):
            assert process.returncode == 0, text[-3000:]

    machines(2)
    first = json.loads((output / "training_report.json").read_text())
    assert first["processes"] == 2 and first["zero3_init"] is True and first["steps"] == 2
    machines(4, "--resume_from_checkpoint", "latest")
    report = json.loads((output / "training_report.json").read_text())
    assert report["resumed_from"].endswith("step_00000002") and report["steps"] == 4
    assert sorted(r["step"] for r in read_metrics(output) if "loss" in r) == [1, 2, 3, 4]
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.vocab_size == math.ceil(len(AutoTokenizer.from_pretrained(extended_tokenizer)) / 64) * 64


def test_throughput_counts_training_time_only(tmp_path, tiny_mistral_path):
    """Evaluation (here 0.5 s of sleep after steps 1 and 2) is not in tokens/s: the logged rate times
    the training-only time gives back every token trained."""
    from toolkit import training

    args = training.LoopArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, logging_steps=3,
                                  eval_steps=1, report_to="none")
    accelerator = training.make_accelerator(args)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    blocks = [{"input_ids": torch.arange(3, 35), "labels": torch.arange(3, 35)} for _ in range(6)]
    started = time.time()
    state = training.train(accelerator, model, optimizer, scheduler, blocks, pretrain.packing.stack, args,
                           training.TrainState(), num_training_steps=3,
                           evaluate=lambda step: time.sleep(0.5) or {"eval_marker": step})
    elapsed = time.time() - started
    record = [r for r in read_metrics(tmp_path) if "tokens_per_second" in r][-1]
    assert state.tokens_seen == 3 * 2 * 32 and state.pause_seconds >= 1.0
    assert state.train_seconds <= elapsed - state.pause_seconds
    assert record["tokens_per_second"] * state.train_seconds == pytest.approx(state.tokens_seen, rel=0.02)
    assert record["tokens_per_second"] > state.tokens_seen / (elapsed - 1.0)  # the eval pauses are not in it


def test_deepspeed_gradients_accumulate_and_reduce_in_fp32_by_default():
    from toolkit import training

    settings = training.deepspeed_gradient_precision(training.LoopArguments())
    assert settings == {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    switched = training.LoopArguments(grad_accum_dtype="fp32", grad_reduce_dtype="bf16")
    assert training.deepspeed_gradient_precision(switched)["communication_data_type"] == "bf16"
    with pytest.raises(ValueError, match="--grad_reduce_dtype must be fp32, bf16 or fp16"):
        training.deepspeed_gradient_precision(training.LoopArguments(grad_reduce_dtype="float8"))


@pytest.mark.slow
@pytest.mark.parametrize("init", DATA_INITS)
def test_data_aware_embedding_init_under_two_process_zero3(init, tmp_path, tiny_mistral_path, extended_tokenizer,
                                                           corpus):
    """The data-aware init runs before the loop on both processes of CPU ZeRO-3 (contexts split, features
    gathered, gradients summed): its objective falls, it is reported, and with learning rate 0 the saved
    model's base-vocabulary rows are the base model's, bit for bit."""
    output = tmp_path / "init"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--config_file", str(CONFIGS / "cpu_zero3_2proc.yaml"), "scripts/pretrain.py",
               *map(str, common(tiny_mistral_path, extended_tokenizer, corpus, output)),
               "--embedding_init", init, "--embedding_init_context_tokens", "512", "--embedding_init_steps", "3",
               "--embedding_init_target_layer", "1", "--per_device_train_batch_size", "2", "--max_train_steps", "1",
               "--learning_rate", "0", "--save_dtype", "float32"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, timeout=400, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "embedding init" in result.stderr  # the progress bar
    fit = json.loads((output / "training_report.json").read_text())["embeddings"]["fit"]
    assert fit["processes"] == 2 and fit["contexts"] == 8 and fit["context_tokens"] == 512
    assert fit["objective_after"]["next_token_cross_entropy"] < fit["objective_before"]["next_token_cross_entropy"]
    assert fit["seconds"] > 0 and fit["new_tokens_with_contexts"] > 0
    base = AutoModelForCausalLM.from_pretrained(tiny_mistral_path)
    saved = AutoModelForCausalLM.from_pretrained(output)
    for matrix in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(saved, matrix)().weight[:32000], getattr(base, matrix)().weight), matrix
