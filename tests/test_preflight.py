"""toolkit/preflight.py through pretrain.py: the plan is printed and reported before the first step, a disk
too small for --checkpoints_total_limit + 1 checkpoints is refused (--ignore_disk_check overrides), and the
memory estimate is within 25% of the measured peak resident set size of 2-process CPU ZeRO-3 runs of two
model shapes."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from test_pretrain import CONFIGS, ENV, REPO_ROOT, common, corpus, extended_tokenizer, run_main  # noqa: F401
from toolkit import preflight


def test_a_disk_too_small_is_refused_before_the_first_step(monkeypatch, tmp_path, capsys, tiny_mistral_path,
                                                           extended_tokenizer, corpus):  # noqa: F811
    arguments = [*common(tiny_mistral_path, extended_tokenizer, corpus, tmp_path / "out"),
                 "--per_device_train_batch_size", "2", "--max_train_steps", "1", "--checkpointing_steps", "1",
                 "--checkpoints_total_limit", "2"]
    monkeypatch.setattr(preflight, "_free_disk", lambda path: (10 * 2**20, "/small-disk"))  # 10 MiB free
    with pytest.raises(SystemExit, match=r"/small-disk has 0.0 GiB free, the run needs .*GiB \(3 checkpoints"):
        run_main(monkeypatch, *arguments)
    printed = capsys.readouterr().out
    assert "preflight:" in printed and "tokens per step" in printed
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or "loss" not in (tmp_path / "out" / "metrics.jsonl").read_text()
    run_main(monkeypatch, *arguments, "--ignore_disk_check")
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    plan = report["preflight"]
    assert plan["disk_free_bytes"] == 10 * 2**20 and plan["checkpoints_kept_at_once"] == 3
    assert plan["disk_needed_bytes"] > plan["disk_free_bytes"]
    assert plan["tokens_per_step"] == report["tokens_per_step"] == 2 * 64 and plan["steps"] == 1
    checkpoint = sum(f.stat().st_size for f in (tmp_path / "out" / "checkpoints").rglob("*") if f.is_file())
    assert 0.75 <= checkpoint / plan["checkpoint_bytes"] <= 1.25, (checkpoint, plan["checkpoint_bytes"])


def test_reference_plan_of_the_readme():
    """The README's plan for Mistral-7B with a 120k vocabulary on 16 x A100-40 (block 4096, micro-batch 4)."""
    config = AutoConfig.for_model("mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=120064)
    plan = preflight.reference_plan(config, preflight.count_parameters(config))
    memory = plan["memory_per_process_bytes"]
    assert 7.8e9 < plan["parameters"] < 8.0e9
    assert 18 * 2**30 < plan["memory_per_process_total_bytes"] < 30 * 2**30  # fits a 40 GB A100 with headroom
    assert memory["loss"] < 1.6 * 2**30 and 85e9 < plan["checkpoint_bytes"] < 125e9
    assert plan["tokens_per_step"] == 4 * 4096 * 16 * 4 and plan["steps"] == 7630


def wider_model(tiny_mistral_path, folder):
    """tiny-mistral's tokenizer with a model 8x wider and 2x deeper (random weights): the second shape."""
    config = AutoConfig.from_pretrained(tiny_mistral_path)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 1024, 4
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 4, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_mistral_path).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tiny", "wide"])
def test_memory_estimate_within_25_percent_of_measured_peaks(shape, tmp_path, tiny_mistral_path,
                                                             extended_tokenizer, corpus):  # noqa: F811
    model = tiny_mistral_path if shape == "tiny" else wider_model(tiny_mistral_path, tmp_path / "model")
    accelerate = str(Path(REPO_ROOT / ".venv/bin/accelerate")) if (REPO_ROOT / ".venv/bin/accelerate").exists() \
        else "accelerate"
    command = [accelerate, "launch", "--config_file", str(CONFIGS / "cpu_zero3_2proc.yaml"), "scripts/pretrain.py",
               *map(str, common(model, extended_tokenizer, corpus, tmp_path / "out")),
               "--per_device_train_batch_size", "2", "--max_train_steps", "3", "--save_dtype", "float32"]
    subprocess.run(command, cwd=REPO_ROOT, env=ENV, check=True, timeout=400, capture_output=True)
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    estimate = report["preflight"]["memory_per_process_total_bytes"]
    for measured in report["peak_rss_bytes_per_process"]:
        assert abs(estimate - measured) / measured <= 0.25, (shape, estimate, report["peak_rss_bytes_per_process"],
                                                               report["preflight"]["memory_per_process_bytes"])
