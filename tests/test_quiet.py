"""Quiet by default: a real third-party deprecation warning (torch.distributed, as DeepSpeed
triggers it on every ZeRO-3 step) is hidden, `--verbose` shows it, our own code's
deprecations always show. Each case runs in a fresh interpreter so no filter leaks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_pretrain import corpus, extended_tokenizer  # noqa: F401  (fixtures)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

PROGRAM = r"""
import sys, tempfile, warnings
sys.path.insert(0, {scripts!r})
from toolkit.quiet import quiet_by_default
quiet = quiet_by_default()
print("argv", sys.argv[1:], "quiet", quiet, flush=True)
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))  # FutureWarning raised inside torch.distributed
dist.destroy_process_group()
warnings.warn("our_own_api is deprecated", DeprecationWarning)  # attributed to __main__: ours, never hidden
"""


def run(*arguments, **environment):
    env = {key: value for key, value in os.environ.items() if key != "LANGTOOLKIT_VERBOSE"}
    env.update(PYTHONWARNINGS="default", **environment)
    return subprocess.run([sys.executable, "-c", PROGRAM.format(scripts=str(SCRIPTS)), *arguments],
                          capture_output=True, text=True, env=env, check=True, timeout=120)


def test_third_party_deprecations_hidden_by_default_ours_shown():
    result = run("--lr", "1")
    assert "argv ['--lr', '1'] quiet True" in result.stdout
    assert "all_gather_into_tensor` is deprecated" not in result.stderr
    assert "our_own_api is deprecated" in result.stderr


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_verbose_shows_them_and_never_reaches_the_parser(how):
    result = run("--lr", "1", "--verbose") if how == "flag" else run("--lr", "1", LANGTOOLKIT_VERBOSE="1")
    assert "argv ['--lr', '1'] quiet False" in result.stdout
    assert "all_gather_into_tensor` is deprecated" in result.stderr
    assert "our_own_api is deprecated" in result.stderr


def test_every_entry_point_calls_it_first_in_main():
    root = SCRIPTS.parent
    entry_points = sorted(root.glob("scripts/*.py")) + sorted(root.glob("benchmarks/*.py"))
    assert len(entry_points) >= 15
    missing = [path.name for path in entry_points
               if "quiet_by_default(" not in path.read_text(encoding="utf-8").split("\ndef main(", 1)[-1].split("\n")[1]]
    assert missing == []


@pytest.mark.slow
def test_a_pretrain_launch_prints_no_repeated_banners(tmp_path, tiny_mistral_path, extended_tokenizer, corpus):
    """What `make demo` shows of a pretrain stage: the launcher's and every process's banners are gone
    (DeepSpeed's CPU notice and op build line, torch's OMP_NUM_THREADS banner, transformers' per-process
    loading bars and resize advice); the plan, the bar and the results remain."""
    from test_pretrain import CONFIGS, REPO_ROOT, common
    from toolkit.quiet import launch_environment

    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(CONFIGS / "cpu_zero3_2proc.yaml"), "scripts/pretrain.py",
               *map(str, common(tiny_mistral_path, extended_tokenizer, corpus, tmp_path / "out")),
               "--per_device_train_batch_size", "2", "--max_train_steps", "2"]
    env = {key: value for key, value in launch_environment().items() if key != "LANGTOOLKIT_VERBOSE"}
    result = subprocess.run(command, cwd=REPO_ROOT, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                            text=True, timeout=400, check=True)
    output = result.stdout + result.stderr
    for banner in ("Setting accelerator to CPU", "OMP_NUM_THREADS", "built successfully", "multivariate normal"):
        assert banner not in output, banner
    assert output.count("Loading weights:   0%") <= 1  # one loading bar started: the main process's
    assert "preflight:" in output and "train: 100%" in output and "training_report.json" in output
