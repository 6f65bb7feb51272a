import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toolkit.chat import chat_template, prompt_text
from toolkit.evaluation import (
    TaskError, continuation_logprobs, generate_answers, lm_eval_tasks, load_metric, paired_bootstrap, ratio_of_sums, read_task,
    score_multiple_choice,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_mistral_path):
    return AutoModelForCausalLM.from_pretrained(tiny_mistral_path).eval(), AutoTokenizer.from_pretrained(tiny_mistral_path)


def test_multiple_choice_picks_the_right_option(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    example = {"prompt": "What is the capital of France? Answer in one sentence.", "label": 1,
               "choices": ["The capital of France is Tokyo.", "The capital of France is Paris.",
                           "The capital of France is Canberra."]}
    chosen, scores = score_multiple_choice(model, tokenizer, chat_template(tokenizer), example)
    assert chosen == 1 and scores[1] == max(scores)
    # normalised per character: a long wrong option is not favoured or punished for its length
    assert all(math.isfinite(s) and s < 0 for s in scores)


def test_shared_prefix_cache_gives_the_same_scores_as_separate_passes(tiny):
    model, tokenizer = tiny
    context = prompt_text(tokenizer, "次の文章の続きを一文書いてください。\n\nGIMP は画像編集ソフトです。", chat_template(tokenizer))
    options = ["画像を開きます。", "これは長めの別の選択肢で、トークン数が違います。", "x"]
    fast = continuation_logprobs(model, tokenizer, context, options)
    for option, score in zip(options, fast):
        encoding = tokenizer(context + option, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        first = next(i for i, (_, end) in enumerate(encoding["offset_mapping"]) if end > len(context))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        expected = sum(logprobs[i - 1, ids[i]].item() for i in range(first, len(ids)))
        assert math.isclose(score, expected, rel_tol=1e-4, abs_tol=1e-3)


def test_bootstrap_is_deterministic_with_a_seed_and_covers_the_difference():
    rng = np.random.default_rng(7)
    first = rng.integers(0, 2, 200).astype(float)
    second = np.where(rng.random(200) < 0.3, 1.0, first)  # second is right more often
    interval = paired_bootstrap(first, second, num_samples=500, seed=3)
    assert interval == paired_bootstrap(first, second, num_samples=500, seed=3)
    assert interval != paired_bootstrap(first, second, num_samples=500, seed=4)
    low, high = interval
    assert low <= second.mean() - first.mean() <= high and low > 0
    assert paired_bootstrap(first, first, num_samples=100, seed=0) == (0.0, 0.0)


def test_bits_per_character_bootstrap_uses_the_ratio_of_sums():
    rows = [(math.log(2) * 6, 3), (math.log(2) * 2, 1)]  # 8 bits over 4 characters
    assert math.isclose(ratio_of_sums(rows), 2.0)


def test_shipped_metrics_load_offline_and_score_japanese_by_character():
    exact = load_metric("exact_match").compute(predictions=["概観", " 概観 ", "設定"], references=["概観"] * 3,
                                               regexes_to_ignore=[r"^\s+", r"\s+$"], return_scores=True)
    assert exact["scores"] == [1.0, 1.0, 0.0]
    characters = load_metric("char_f1").compute(predictions=["タイルの設定", "無関係"],
                                                references=["タイルキャッシュの設定方法", "概観"], return_scores=True)
    # all 6 predicted characters occur in the 13-character reference, in the same order
    predicted, reference = "タイルの設定", "タイルキャッシュの設定方法"
    precision, recall = 6 / len(predicted), 6 / len(reference)
    assert math.isclose(characters["char_f1_scores"][0], 2 * precision * recall / (precision + recall))
    assert characters["char_f1_scores"][1] == 0.0 and characters["char_rouge_l_scores"][1] == 0.0
    assert math.isclose(characters["char_rouge_l_scores"][0], characters["char_f1_scores"][0])  # in order: LCS = 6
    with pytest.raises(FileNotFoundError, match="metric module missing"):
        load_metric("bleu")


def test_lm_eval_runs_the_local_task(tiny):
    model, tokenizer = tiny
    output = lm_eval_tasks(model, tokenizer, ["ja_debian_heading_mc"], include_path=REPO / "sample_data/tasks/lm_eval",
                           limit=3, samples=True)
    result = output["results"]["ja_debian_heading_mc"]
    assert 0.0 <= result["acc,none"] <= 1.0
    assert len(output["samples"]["ja_debian_heading_mc"]["acc"]) == 3
    assert np.mean(output["samples"]["ja_debian_heading_mc"]["acc"]) == result["acc,none"]


@pytest.mark.parametrize("content, message", [
    ("", "empty.jsonl: the file is empty"),
    ('{"prompt": "q", "choices": ["a", "b"], "label": 2}\n', r"bad.jsonl:1: 'label' must be the index"),
    ('{"prompt": "q", "choices": ["a"], "label": 0}\n', r"bad.jsonl:1: 'choices' must be a list of at least two"),
    ('{"prompt": "q"}\n', r"bad.jsonl:1: a task record needs 'choices' and 'label', or a 'reference'"),
    ('{"prompt": "q", "reference": "a"}\n{"prompt": "q", "choices": ["a", "b"], "label": 0}\n',
     r"bad.jsonl:2: a multiple_choice record in a generation task file"),
    ('{"choices": ["a", "b"], "label": 0}\n', r"bad.jsonl:1: no 'prompt' field"),
])
def test_bad_task_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / ("empty.jsonl" if not content else "bad.jsonl")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskError, match=message):
        read_task(path)


def run_ablation(tmp_path, *extra):
    command = [sys.executable, "scripts/evaluate_ablation.py", "--output_dir", str(tmp_path / "out"),
               "--task_dir", "sample_data/tasks", "--max_eval_documents", "2", "--max_eval_characters", "300",
               "--max_task_examples", "3", "--max_new_tokens", "4", "--lm_eval_limit", "2",
               "--bootstrap_samples", "50", *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_identical_models_differ_by_nothing_and_the_verdict_says_noise(tmp_path, tiny_mistral_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_mistral_path, copy)
    done = run_ablation(tmp_path, "--models", "offline:tiny-mistral", str(copy), "--model_names", "base", "copy")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "ablation_results.json").read_text())
    assert results["baseline"] == "base" and [m["name"] for m in results["models"]] == ["base", "copy"]
    tasks = {(row["task"], row["metric"]) for row in results["metrics"]}
    assert {("heldout_ja", "bits_per_character"), ("heldout_en", "bits_per_byte"), ("heading_mc", "accuracy"),
            ("heading_generation", "char_f1"), ("heading_generation", "stops_with_eos"),
            ("lm_eval:ja_debian_heading_mc", "acc")} <= tasks
    for row in results["metrics"]:
        difference = row["differences"]["copy"]
        assert row["values"]["base"] == row["values"]["copy"]
        assert difference["difference"] == 0 and difference["ci95"] == [0.0, 0.0]
        assert difference["verdict"] == "within noise"
    assert "within noise" in results["verdict"]
    table = (tmp_path / "out" / "ablation_table.md").read_text()
    assert "| heading_mc | accuracy ↑ | 3 |" in table
    assert (tmp_path / "out" / "ablation_chart.png").stat().st_size > 0
    predictions = (tmp_path / "out" / "base" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3 * 4  # 3 questions per task file


def test_a_model_without_eos_is_refused_before_any_work(tmp_path, tiny_mistral_path):
    broken = tmp_path / "no-eos"
    shutil.copytree(tiny_mistral_path, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    done = run_ablation(tmp_path, "--models", "offline:tiny-mistral", str(broken), "--lm_eval_tasks", "none")
    assert done.returncode != 0
    assert f"{broken}: the tokenizer has no EOS token" in done.stderr
    assert not (tmp_path / "out" / "ablation_results.json").exists()


def test_an_empty_task_file_is_refused(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.jsonl").write_text("")
    done = run_ablation(tmp_path, "--models", "offline:tiny-mistral", "--task_dir", str(tasks))
    assert done.returncode != 0 and f"{tasks / 'mine.jsonl'}: the file is empty" in done.stderr


def test_batched_generation_matches_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    template = chat_template(tokenizer)
    prompts = ["見出しを答えてください。", "次の文章の続きを一文書いてください。\n\nGIMP は画像編集ソフトです。", "短い"]
    batched = generate_answers(model, tokenizer, template, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_answers(model, tokenizer, template, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(length == 6 and not stopped for _, stopped, length in batched)  # a random model never stops


def test_every_base_is_fine_tuned_with_the_same_arguments():
    from evaluate_ablation import AblationArguments, FinetuneSettings, finetune_command

    args = AblationArguments(models=["a", "b"], output_dir="out")
    settings = FinetuneSettings(finetune=True, finetune_max_train_steps=3, finetune_extra_args="--save_dtype bfloat16")
    first = finetune_command("org/raw-base", "out/finetuned/base", args, settings)
    second = finetune_command("out/pretrain", "out/finetuned/extended", args, settings)
    differing = [(x, y) for x, y in zip(first, second) if x != y]
    assert differing == [("org/raw-base", "out/pretrain"), ("out/finetuned/base", "out/finetuned/extended")]
    assert len(first) == len(second)
    assert first[first.index("--seed") + 1] == "42" and first[first.index("--max_train_steps") + 1] == "3"
    assert first[-2:] == ["--save_dtype", "bfloat16"]
