import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from extended_tokenizers import extend_with_merges
from toolkit.chat import chat_template, prompt_text
from toolkit.evaluation import (
    CharacterBudget, TaskError, bootstrap_difference, continuation_logprobs, generate_answers,
    balanced_accuracy_of_rows, holm_adjust, lm_eval_task_manager_for, lm_eval_tasks, load_metric, macro_f1_of_rows,
    paired_bootstrap, ratio_of_sums, read_task, score_multiple_choice,
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
               "--max_task_examples", "3", "--max_new_characters", "6", "--lm_eval_limit", "2",
               "--bootstrap_samples", "50", "--speed_prompts", "2", "--speed_new_characters", "8",
               "--speed_repeats", "1", *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def extended_tiny_model(tiny_mistral_path, folder):
    """tiny-mistral with a few Japanese merges added and its embeddings resized: an 'extended' arm."""
    extend_with_merges(tiny_mistral_path, ["日本語", "設定", "ファイル"], folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(folder)))
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_three_arms_end_to_end_identical_arms_differ_by_nothing(tmp_path, tiny_mistral_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_mistral_path, copy)
    extended = extended_tiny_model(tiny_mistral_path, tmp_path / "extended")
    mix = tmp_path / "mix.jsonl"
    item = json.loads((REPO / "sample_data/tasks/heading_mc.jsonl").read_text().splitlines()[0])
    mix.write_text(json.dumps({"text": "前置き。" + item["prompt"][-60:]}, ensure_ascii=False) + "\n"
                   + json.dumps({"text": "関係のない文章です。" * 5}, ensure_ascii=False) + "\n")
    done = run_ablation(tmp_path, "--models", "offline:tiny-mistral", str(copy), str(extended),
                        "--model_names", "base", "continued", "extended",
                        "--effects", "data=continued:base", "tokenizer=extended:continued",
                        "--lm_eval_tasks", "ja_debian_heading_mc", "--contamination_files", str(mix))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "ablation_results.json").read_text())
    assert results["data_revisions"] == {}  # a local task file: no Hub or GitHub revision to record
    assert results["baseline"] == "base" and [m["name"] for m in results["models"]] == ["base", "continued", "extended"]
    assert results["effects"] == [{"name": "data", "minuend": "continued", "subtrahend": "base"},
                                  {"name": "tokenizer", "minuend": "extended", "subtrahend": "continued"}]
    rows = {(row["task"], row["metric"]): row for row in results["metrics"]}
    assert {("heldout_ja", "bits_per_character"), ("heldout_en", "bits_per_byte"), ("heading_mc", "accuracy"),
            ("heading_generation", "char_f1"), ("heading_generation", "stops_with_eos"),
            ("lm_eval:ja_debian_heading_mc", "acc")} <= set(rows)
    primary = sorted(task for task, metric in rows if rows[(task, metric)]["primary"])
    assert primary == sorted(["heldout_ja", "heldout_en", "continuation_mc", "heading_mc", "manpage_mc",
                              "heading_generation", "lm_eval:ja_debian_heading_mc"])  # one per task
    assert rows[("heading_generation", "char_f1")]["primary"] and not rows[("heading_generation", "char_rouge_l")]["primary"]
    assert not rows[("heldout_ja", "bits_per_byte")]["primary"]
    for row in results["metrics"]:  # base and its copy: the data effect is exactly zero
        data = row["effects"]["data"]
        assert row["values"]["base"] == row["values"]["continued"]
        assert data["difference"] == 0 and data["ci95"] == [0.0, 0.0] and data["p_value"] == 1.0
        assert data["p_holm"] is None  # too few items: not in Holm's family
    assert "data (continued − base): better on 0 of 7 tasks" in results["verdict"]
    assert "tokenizer (extended − continued)" in results["verdict"]
    speed = results["decoding_speed"]
    assert set(speed) == {"base", "continued", "extended"} and set(results["free_generation"]) == set(speed)
    assert all(s["characters_per_second"] > 0 and s["tokens_per_second"] > 0 for s in speed.values())
    # every arm decodes the same reference characters (the test merges need a space before them: as many tokens)
    assert len({s["characters"] for s in speed.values()}) == 1
    assert speed["extended"]["tokens"] <= speed["continued"]["tokens"] == speed["base"]["tokens"]
    assert set(results["speed_ratios"]) == {"data", "tokenizer"}
    assert results["speed_ratios"]["data"]["characters_per_token"] == 1.0
    # 3 items per task, 2 held-out documents: every row is under --min_items_for_verdict
    assert all(e["verdict"] == "too few items to tell" for row in results["metrics"] for e in row["effects"].values())
    contamination = results["contamination"]["tasks"]  # a row for every evaluated task, over its evaluated items
    assert set(contamination) == {"continuation_mc", "heading_generation", "heading_mc", "manpage_mc", "heldout_ja",
                                  "heldout_en", "lm_eval:ja_debian_heading_mc"}
    assert contamination["heading_mc"]["items_overlapping"] == 1 and contamination["heading_mc"]["items"] == 3
    assert contamination["lm_eval:ja_debian_heading_mc"] == {"items": 2, "items_overlapping": 1,
                                                              "mix_documents_overlapping": 1}
    assert contamination["manpage_mc"]["items_overlapping"] == 0 and contamination["heldout_ja"]["items"] == 2
    table = (tmp_path / "out" / "ablation_table.md").read_text()
    assert "| heading_mc | **accuracy** ↑ | 3 |" in table and "not counted" in table
    assert "reference characters/s" in table and "tokens/s ratio × characters/token ratio" in table
    assert "characters/token written" in table and "too few items to tell" in table
    assert (tmp_path / "out" / "ablation_chart.png").stat().st_size > 0
    predictions = (tmp_path / "out" / "base" / "as-given" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3 * 4  # 3 questions per task file


def test_the_contamination_report_tells_more_than_64_tasks_apart(tmp_path):
    from evaluate_ablation import contamination_report

    items = {f"task{i:02d}": [f"設問{i:02d}番：" + "あいうえおかきくけこ"[i % 10:] + f"{i:02d}さしすせそたちつてと"]
             for i in range(70)}
    mix = tmp_path / "mix.jsonl"
    mix.write_text("\n".join(json.dumps({"text": text}, ensure_ascii=False)
                             for text in ["前置き" + items["task66"][0], "無関係な文章。" * 4]) + "\n", encoding="utf-8")
    report = contamination_report(items, [str(mix)], 13)
    assert report["documents_scanned"] == 2 and len(report["tasks"]) == 70
    assert {name for name, entry in report["tasks"].items() if entry["items_overlapping"]} == {"task66"}
    assert report["tasks"]["task66"]["mix_documents_overlapping"] == 1


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
    batched = generate_answers(model, tokenizer, template, prompts, max_new_characters=10, batch_size=3)
    alone = [generate_answers(model, tokenizer, template, [p], max_new_characters=10, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert not any(stopped for _, stopped, _ in batched)  # a random model never stops


def test_the_answer_budget_is_in_characters_whatever_the_tokenizer(tiny, tiny_mistral_path, tmp_path):
    model, tokenizer = tiny
    extended_folder = extended_tiny_model(tiny_mistral_path, tmp_path / "extended")
    arms = {"base": (model, tokenizer),
            "extended": (AutoModelForCausalLM.from_pretrained(extended_folder).eval(),
                         AutoTokenizer.from_pretrained(extended_folder))}
    prompts = ["見出しを答えてください。", "日本語の設定ファイルについて"]
    for arm_model, arm_tokenizer in arms.values():
        for budget in (5, 12):
            answers = generate_answers(arm_model, arm_tokenizer, chat_template(arm_tokenizer), prompts,
                                       max_new_characters=budget, batch_size=2)
            for text, stopped, new_tokens in answers:
                assert len(text) <= budget and not stopped
                # the random model's tokens decode to several characters: fewer tokens than characters
                assert 0 < new_tokens < budget
    # the stopping rule itself: a row is done once its new tokens decode to the budget
    ids = tokenizer("日本語のテキスト", add_special_tokens=False)["input_ids"]
    row = torch.tensor([[1] + ids])
    done_at = [CharacterBudget(tokenizer, 1, budget)(row, None).item() for budget in (3, 8, 9)]
    assert done_at == [True, True, False]
    from toolkit.speed import GreedyWriter, free_generation

    assert set(tokenizer.all_special_ids) <= set(GreedyWriter(model, tokenizer, prompts, 12, 2).suppressed)
    for arm_model, arm_tokenizer in arms.values():
        written = free_generation(arm_model, arm_tokenizer, prompts, new_characters=12, batch_size=2)
        assert written["characters"] >= 2 * 12
        assert written["characters"] == sum(len(t) for t in written["texts"]) - written["replacement_characters"]
        assert written["characters_per_token"] == written["characters"] / written["tokens"]


def test_every_base_is_fine_tuned_with_the_same_arguments_once_per_seed():
    from evaluate_ablation import AblationArguments, FinetuneSettings, finetune_command

    args = AblationArguments(models=["a", "b"], output_dir="out")
    settings = FinetuneSettings(finetune=True, finetune_max_train_steps=3, finetune_extra_args="--save_dtype bfloat16",
                                seeds=[0, 1])
    first = finetune_command("org/raw-base", "out/finetuned/base/seed1", args, settings, seed=1)
    second = finetune_command("out/pretrain", "out/finetuned/extended/seed1", args, settings, seed=1)
    differing = [(x, y) for x, y in zip(first, second) if x != y]
    assert differing == [("org/raw-base", "out/pretrain"), ("out/finetuned/base/seed1", "out/finetuned/extended/seed1")]
    assert len(first) == len(second)
    assert first[first.index("--seed") + 1] == "1" and first[first.index("--max_train_steps") + 1] == "3"
    assert first[-2:] == ["--save_dtype", "bfloat16"]


def test_effects_default_to_consecutive_arms_and_bad_specs_are_refused():
    from evaluate_ablation import parse_effects

    names = ["base", "continued", "extended"]
    assert parse_effects(None, names) == [("continued − base", "continued", "base"),
                                          ("extended − continued", "extended", "continued")]
    assert parse_effects(["tokenizer=extended:continued"], names) == [("tokenizer", "extended", "continued")]
    for bad in (["tokenizer=extended:nope"], ["x=base:base"], ["extended:base"]):
        with pytest.raises(ValueError, match="--effects"):
            parse_effects(bad, names)


def test_holm_correction_hand_computed():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> max so far 0.06
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    assert [p < 0.05 for p in adjusted] == [True, False, False, True]
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0] and holm_adjust([0.01]) == [0.01]


def test_the_interval_resamples_over_seeds_as_well_as_examples():
    rng = np.random.default_rng(0)
    items = rng.random(60)
    # the second model is +0.3 with seed 0 and -0.3 with seed 1: the fine-tuning seed decides
    first_runs = [items, items]
    second_runs = [items + 0.3, items - 0.3]
    one_seed = bootstrap_difference(first_runs[:1], second_runs[:1], num_samples=400, seed=0)
    both = bootstrap_difference(first_runs, second_runs, num_samples=400, seed=0)
    assert np.allclose(one_seed["ci95"], [0.3, 0.3])
    assert both["ci95"][0] <= -0.29 and both["ci95"][1] >= 0.29
    with pytest.raises(ValueError, match="same number"):
        bootstrap_difference(first_runs, second_runs[:1])


def three_arm_results(rng, items=40):
    """base at 25% accuracy, continued and extended at 85% on every task (no tokenizer effect),
    two seeds; bits per character lower for both continued arms."""
    def accuracy(p):
        return (rng.random(items) < p).astype(float)

    chars = rng.integers(200, 400, items)  # the same held-out text for every model

    def run(p, nll_per_char):
        per_example = {(task, "accuracy"): accuracy(p) for task in ("task_a", "task_b", "task_c")}
        per_example[("task_c", "accuracy_again")] = per_example[("task_c", "accuracy")]  # a related figure
        per_example[("heldout_ja", "bits_per_character")] = np.stack([chars * nll_per_char * np.log(2), chars], 1)
        return per_example

    continued = [run(0.85, 2.0), run(0.85, 2.0)]
    extended = [{key: values.copy() for key, values in seed_run.items()} for seed_run in continued]
    return {"base": [run(0.25, 4.0), run(0.25, 4.0)], "continued": continued, "extended": extended}


def test_three_arm_verdict_states_the_data_and_the_tokenizer_effect_separately():
    from types import SimpleNamespace

    from evaluate_ablation import compare, markdown_table, verdict_paragraph

    names = ["base", "continued", "extended"]
    effects = [("data", "continued", "base"), ("tokenizer", "extended", "continued")]
    primary = {"task_a": "accuracy", "task_b": "accuracy", "task_c": "accuracy", "heldout_ja": "bits_per_character"}
    args = SimpleNamespace(bootstrap_samples=300, seed=0, alpha=0.05, permutations=999, min_items_for_verdict=20)
    rows = compare(names, effects, three_arm_results(np.random.default_rng(1)), primary, args)
    by_key = {(row["task"], row["metric"]): row for row in rows}
    for task in ("task_a", "task_b", "task_c", "heldout_ja"):
        row = by_key[(task, primary[task])]
        assert row["primary"] and row["effects"]["data"]["verdict"] == "better"
        assert row["effects"]["data"]["survives_holm"] and row["effects"]["data"]["p_holm"] < 0.05
        assert row["effects"]["tokenizer"]["difference"] == 0 and row["effects"]["tokenizer"]["verdict"] == "within noise"
        assert not row["effects"]["tokenizer"]["survives_holm"]
    again = by_key[("task_c", "accuracy_again")]
    assert not again["primary"] and again["effects"]["data"]["p_holm"] is None  # shown, not counted
    assert by_key[("heldout_ja", "bits_per_character")]["values"]["continued"] == pytest.approx(2.0)
    speed = {name: {"characters_per_second": cps, "tokens_per_second": 10.0, "characters_per_token": cpt,
                    "reference_characters": 8, "prompts": 2, "batch_size": 2, "device": "cpu", "repeats": 1}
             for name, cps, cpt in (("base", 10.0, 1.0), ("continued", 10.0, 1.0), ("extended", 25.0, 2.5))}
    verdict = verdict_paragraph(names, effects, rows, speed, 0.05)
    assert "data (continued − base): better on 4 of 4 tasks (task_a, task_b, task_c, heldout_ja)" in verdict
    assert "tokenizer (extended − continued): better on 0 of 4 tasks" in verdict
    assert "25.0 vs 10.0 characters/s (2.50x = 1.00x tokens/s × 2.50x characters/token)" in verdict
    assert "Too few items" not in verdict
    table = markdown_table(names, effects, rows, speed, None)
    assert "| task_c | accuracy_again ↑ |" in table and "not counted" in table and "✓" in table


def test_holm_can_withdraw_a_difference_the_interval_alone_would_call(monkeypatch):
    """Six tasks, each with a difference at p ~ 0.02: every interval excludes 0, none survives Holm."""
    from types import SimpleNamespace

    import evaluate_ablation

    monkeypatch.setattr(evaluate_ablation, "bootstrap_difference", lambda *a, **k: {"ci95": [0.01, 0.2]})
    monkeypatch.setattr(evaluate_ablation, "paired_permutation_p", lambda *a, **k: 0.02)
    tasks = [f"t{i}" for i in range(6)]
    results = {name: [{(task, "accuracy"): [0.0, 1.0] for task in tasks}] for name in ("a", "b")}
    rows = evaluate_ablation.compare(["a", "b"], [("e", "b", "a")], results, {t: "accuracy" for t in tasks},
                                     SimpleNamespace(bootstrap_samples=10, seed=0, alpha=0.05, permutations=99,
                                                     min_items_for_verdict=2))
    assert all(row["effects"]["e"]["p_holm"] == pytest.approx(0.12) for row in rows)
    assert all(row["effects"]["e"]["verdict"] == "within noise" for row in rows)


def test_a_task_file_declares_its_primary_metric(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text('{"prompt": "q", "reference": "a", "primary_metric": "exact_match"}\n'
                    '{"prompt": "q2", "reference": "b", "primary_metric": "exact_match"}\n', encoding="utf-8")
    assert read_task(path).primary_metric == "exact_match"
    path.write_text('{"prompt": "q", "reference": "a"}\n', encoding="utf-8")
    assert read_task(path).primary_metric == "char_f1"  # the default for generation
    path.write_text('{"prompt": "q", "reference": "a", "primary_metric": "exact_match"}\n'
                    '{"prompt": "q2", "reference": "b", "primary_metric": "char_f1"}\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"gen.jsonl:2: primary_metric 'char_f1', but line 1 declares 'exact_match'"):
        read_task(path)
    path.write_text('{"prompt": "q", "reference": "a", "primary_metric": "accuracy"}\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"gen.jsonl:1: primary_metric 'accuracy' is not a metric of a generation"):
        read_task(path)


def test_bundled_tasks_declare_one_primary_metric(sample_data):
    from toolkit.evaluation import read_tasks

    declared = {task.name: task.primary_metric for task in read_tasks(sample_data / "tasks")}
    assert declared == {"continuation_mc": "accuracy", "heading_generation": "char_f1", "heading_mc": "accuracy",
                        "manpage_mc": "accuracy"}
    for task in read_tasks(sample_data / "tasks"):
        assert all(example["primary_metric"] == task.primary_metric for example in task.examples)


JGLUE_PREFIX = "hf://datasets/shunk031/JGLUE@refs%2Fconvert%2Fparquet"
JGLUE_TASKS = ["ja_jglue_jcommonsenseqa", "ja_jglue_jnli", "ja_jglue_marc_ja", "ja_jglue_jsquad"]
TASK_YAMLS = REPO / "sample_data/tasks/lm_eval"


def jglue_rows(config, count):
    """A few rows in the schema of each JGLUE config's parquet conversion."""
    if config == "JCommonsenseQA":
        return [{"q_id": i, "question": f"質問{i}はどれですか。", **{f"choice{k}": f"選択肢{k}" for k in range(5)},
                 "label": i % 5} for i in range(count)]
    if config == "JNLI":
        return [{"sentence_pair_id": str(i), "yjcaptions_id": f"{i}-{i}", "sentence1": f"男性{i}が歩いている。",
                 "sentence2": "人が歩いている。", "label": i % 3} for i in range(count)]
    if config == "MARC-ja":
        return [{"sentence": f"とても良い商品でした{i}。", "label": int(i % 4 == 3), "review_id": f"R{i}"}
                for i in range(count)]
    return [{"id": f"q{i}", "title": "東京", "context": "東京 [SEP] 東京は日本の首都である。", "question": "日本の首都はどこ？",
             "answers": {"text": ["東京"], "answer_start": [0]}, "is_impossible": False} for i in range(count)]


def local_task(include, task, data_files, **overrides):
    """A task YAML in `include` that includes the shipped YAML of `task` and reads local files
    instead of the Hub: the shipped prompt, metrics, filters and functions, other data."""
    import yaml

    shipped = TASK_YAMLS / f"{task}.yaml"
    config = {"include": str(shipped), "task": task, "dataset_kwargs": {"data_files": data_files}, **overrides}
    text = shipped.read_text(encoding="utf-8")
    if "hf://datasets/" in text:  # the Hub, at a named revision
        assert all("@" in url.split("/")[1] for url in text.split("hf://datasets/")[1:])
    elif "raw.githubusercontent.com/" in text:  # a GitHub repository's files at a commit
        assert all(re.fullmatch(r"[0-9a-f]{40}", url.split("/")[2])
                   for url in text.split("raw.githubusercontent.com/")[1:])
    else:  # files that a pinned package writes (sacrebleu's test sets)
        assert "sacrebleu" in text
    (include / f"{task}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")


SHORT_GENERATION = {"generation_kwargs": {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 4}}


def test_jglue_yamls_load_parquet_in_the_same_schema_offline(tiny, tmp_path):
    """Every JGLUE task YAML, with only its data pointed at local parquet, runs in lm-eval and
    reports the harnesses' metrics: balanced accuracy first for MARC-ja and JNLI, char-F1 for JSQuAD."""
    from datasets import Dataset

    model, tokenizer = tiny
    include = tmp_path / "lm_eval"
    include.mkdir()
    for task, config in zip(JGLUE_TASKS, ("JCommonsenseQA", "JNLI", "MARC-ja", "JSQuAD")):
        files = {}
        for split, count in (("train", 6), ("validation", 4)):
            files[split] = str(tmp_path / config / f"{split}.parquet")
            (tmp_path / config).mkdir(exist_ok=True)
            Dataset.from_list(jglue_rows(config, count)).to_parquet(files[split])
        local_task(include, task, files, **(SHORT_GENERATION if task == "ja_jglue_jsquad" else {}))
    output = lm_eval_tasks(model, tokenizer, JGLUE_TASKS, include_path=include, limit=4, samples=True)
    assert output["primary"] == {"ja_jglue_jcommonsenseqa": "acc", "ja_jglue_jnli": "balanced_acc",
                                 "ja_jglue_marc_ja": "balanced_acc", "ja_jglue_jsquad": "char_f1"}
    assert len(output["samples"]["ja_jglue_jcommonsenseqa"]["acc"]) == 4
    for task in ("ja_jglue_jnli", "ja_jglue_marc_ja"):
        pairs = output["samples"][task]["balanced_acc"]
        golds = [int(gold) for gold, _ in pairs]
        assert golds == [int(row["label"]) for row in jglue_rows("JNLI" if "jnli" in task else "MARC-ja", 4)]
        # lm-eval's aggregate is scikit-learn's over the same (gold, predicted) rows as the ablation resamples
        assert output["results"][task]["balanced_acc,none"] == pytest.approx(balanced_accuracy_of_rows(pairs))
        assert output["results"][task]["macro_f1,none"] == pytest.approx(macro_f1_of_rows(pairs))
        accuracy = np.mean([gold == predicted for gold, predicted in pairs])
        assert output["results"][task]["acc,none"] == pytest.approx(accuracy)
    jnli = lm_eval_task_manager_for(["ja_jglue_jnli"], include).load_task_or_group(["ja_jglue_jnli"])["ja_jglue_jnli"]
    assert type(jnli.sampler).__name__ == "LabelStratifiedSampler"  # the YAML's fewshot_config reaches lm-eval
    assert sorted(shot["label"] for shot in jnli.sampler.sample(3)) == [0, 1, 2]
    jsquad = output["results"]["ja_jglue_jsquad"]
    assert 0.0 <= jsquad["char_f1,character_budget"] <= 1.0 and 0.0 <= jsquad["exact_match,character_budget"] <= 1.0
    assert len(output["samples"]["ja_jglue_jsquad"]["char_f1"]) == 4


def test_balanced_accuracy_does_not_reward_the_majority_class():
    always_positive = [(0, 0)] * 9 + [(1, 0)]  # MARC-ja-like: 90% one class, the model always says it
    assert np.mean([g == p for g, p in always_positive]) == 0.9
    assert balanced_accuracy_of_rows(always_positive) == 0.5
    assert macro_f1_of_rows(always_positive) == pytest.approx(0.5 * 2 * 0.9 / 1.9)


def test_jnli_few_shot_examples_cycle_through_the_labels():
    sys.path.insert(0, str(TASK_YAMLS))
    try:
        from ja_tasks import LabelStratifiedSampler
    finally:
        sys.path.remove(str(TASK_YAMLS))
    pool = [{"id": i, "label": label} for i, label in enumerate([0] * 20 + [1] * 3 + [2] * 3)]
    sampler = LabelStratifiedSampler(pool, rnd=0)
    for draw in range(20):
        shots = sampler.sample(3, eval_doc=pool[draw])
        assert sorted(shot["label"] for shot in shots) == [0, 1, 2] and pool[draw] not in shots
    assert [shot["label"] for shot in sampler.sample(5)].count(0) <= 2  # 5 shots over 3 labels: 2, 2, 1
    with pytest.raises(ValueError, match="per label"):
        sampler.sample(12)  # 4 of each label; labels 1 and 2 have 3 examples each


def test_the_model_card_shows_both_effects_speed_and_contamination():
    from toolkit import model_card as mc

    effect = {"difference": 0.2, "ci95": [0.1, 0.3], "p_value": 0.01, "p_holm": 0.02, "survives_holm": True,
              "verdict": "better"}
    noise = {"difference": 0.0, "ci95": [-0.1, 0.1], "p_value": 0.9, "p_holm": 0.9, "survives_holm": False,
             "verdict": "within noise"}
    too_few = {"difference": 0.1, "ci95": [0.05, 0.2], "p_value": 0.25, "p_holm": None, "survives_holm": None,
               "verdict": "too few items to tell"}
    report = {
        "models": [{"name": "base"}, {"name": "continued"}, {"name": "extended"}], "baseline": "base",
        "effects": [{"name": "data", "minuend": "continued", "subtrahend": "base"},
                    {"name": "tokenizer", "minuend": "extended", "subtrahend": "continued"}],
        "metrics": [
            {"task": "heading_mc", "metric": "accuracy", "primary": True, "higher_is_better": True, "examples": 40,
             "values": {"base": 0.3, "continued": 0.5, "extended": 0.5}, "effects": {"data": effect, "tokenizer": noise}},
            {"task": "manpage_mc", "metric": "accuracy", "primary": True, "higher_is_better": True, "examples": 6,
             "values": {"base": 0.3, "continued": 0.4, "extended": 0.4}, "effects": {"data": too_few, "tokenizer": too_few}},
            {"task": "heldout_ja", "metric": "bits_per_byte", "primary": False, "higher_is_better": False,
             "values": {"base": 2, "continued": 1.5, "extended": 1.5}, "effects": {"data": effect, "tokenizer": noise}}],
        "seeds": [0], "test": {"permutations": 9999, "min_items_for_verdict": 20},
        "decoding_speed": {name: {"characters_per_second": cps, "tokens_per_second": 10.0, "characters_per_token": cps / 10,
                                  "prompts": 4, "reference_characters": 48, "batch_size": 8, "device": "cpu", "repeats": 3}
                           for name, cps in (("base", 9.0), ("continued", 9.0), ("extended", 22.5))},
        "speed_ratios": {"data": {"characters_per_second": 1.0, "tokens_per_second": 1.0, "characters_per_token": 1.0},
                         "tokenizer": {"characters_per_second": 2.5, "tokens_per_second": 1.0,
                                       "characters_per_token": 2.5}},
        "free_generation": {name: {"characters_per_token": cpt} for name, cpt in
                            (("base", 1.04), ("continued", 0.66), ("extended", 1.0))},
        "contamination": {"ngram": 13, "documents_scanned": 1200,
                          "tasks": {"heading_mc": {"items": 81, "items_overlapping": 2}}},
        "verdict": "data: better on 1 of 1 tasks.",
    }
    facts = mc.ablation_facts(report)
    assert [task["name"] for task in facts["tasks"]] == ["heading_mc", "manpage_mc"]  # related figures are not repeated
    assert facts["comparisons"] == ["data: continued − base", "tokenizer: extended − continued"]
    card = mc.render_card({"ablation": facts}, mc.load_card_config(), "o/m")
    english, japanese = mc.split_languages(card)
    assert ("| section heading (multiple choice) | accuracy | 40 | 0.3000 | 0.5000 | 0.5000 | +0.2000 | [+0.1000, +0.3000] "
            "| 0.020 | better |") in english
    assert "| 節見出しの選択（多肢選択） | 正解率 | 40 | 0.3000 | 0.5000 | 0.5000 | +0.2000 |" in japanese
    # items and seeds per row, the test, and no verdict under the minimum
    assert "| man page description (multiple choice) | accuracy | 6 |" in english
    assert "| – | too few items to tell |" in english and "| – | 設問が少なく判定不能 |" in japanese
    assert "1 fine-tuning seed:" in english and "sign-flip permutation test" in english and "fewer than 20 items" in english
    assert "符号反転の並べ替え検定" in japanese and "ファインチューニングのシード数: 1" in japanese
    assert "too few items to tell on 1" in english and "1 個は設問が少なく判定不能" in japanese
    # speed: forced decoding with its two factors; what free generation wrote, described
    assert "| extended | 22.5 | 10.0 | 2.25 | 1.00 |" in english
    assert "tokenizer effect: 2.50x the reference characters per second (1.00x tokens/s × 2.50x characters/token)" in english
    assert "| section heading (multiple choice) | 81 | 2 |" in english and "13-character n-gram" in english
    assert "| 語彙拡張モデル | 22.5 | 10.0 | 2.25 | 1.00 |" in japanese and "2.50 倍" in japanese
    assert "| 節見出しの選択（多肢選択） | 81 | 2 |" in japanese
    assert "改善" in japanese and "Holm" in japanese
    # the Japanese half names the arms in Japanese, one term per concept, no space after 「。」
    assert "継続事前学習モデル − ベースモデル" in japanese and "continued − base" not in japanese
    assert "元モデル" not in japanese and "95% 信頼区間" in japanese and "。 " not in japanese
    # a label named "items" must not resolve to the dict method in Jinja
    assert "| Task | Items | Overlapping |" in english and "| タスク | 設問数 | 重複あり |" in japanese
    assert "built-in method" not in card


def upstream_rows(task, split, count):
    """A few rows in the schema of the Hub datasets behind lm-eval's japanese_leaderboard tasks."""
    if task == "ja_mgsm":
        return [{"question": f"問題：りんごが{i}個と{i + 2}個あります。全部で何個ですか。",
                 "answer": f"ステップごとの答え：{i}+{i + 2}={2 * i + 2}。答えは{2 * i + 2}です。" if split == "train" else None,
                 "answer_number": 2 * i + 2, "equation_solution": f"{i}+{i + 2}"} for i in range(count)]
    if task == "ja_jaqket_v2":
        return [{"qid": f"QA{i}", "question": f"日本で一番高い山は{i}？", "answers": {"text": ["富士山"]},
                 "ctxs": {"id": [0, 1], "title": ["富士山", "山"], "text": [f"富士山は日本一高い山である{i}。", "山は高い。"],
                          "has_answer": [True, False]}} for i in range(count)]
    if task == "ja_xlsum":
        return [{"id": str(i), "url": f"https://example.org/{i}", "title": f"記事{i}",
                 "summary": "東京で大雨が降った。", "text": f"東京では{i}日、大雨が降った。交通に影響が出ている。"}
                for i in range(count)]
    return [{"sentence1": f"太郎は花子に本を渡した。彼女は喜んだ{i}。", "sentence2": f"太郎は花子に本を渡した。彼は喜んだ{i}。",
             "answer": "1" if i % 2 == 0 else "2"} for i in range(count)]


def _jaqket_features():
    from datasets import Features, Sequence, Value

    return Features({"qid": Value("string"), "question": Value("string"), "answers": Sequence({"text": Value("string")}),
                     "ctxs": Sequence({"id": Value("int64"), "title": Value("string"), "text": Value("string"),
                                       "has_answer": Value("bool")})})


UPSTREAM = {"ja_mgsm": ("ja_leaderboard_mgsm", ("train", "test")),
            "ja_jaqket_v2": ("ja_leaderboard_jaqket_v2", ("train", "validation")),
            "ja_xlsum": ("ja_leaderboard_xlsum", ("train", "test")), "ja_xwinograd": ("ja_leaderboard_xwinograd", ("test",))}


def test_our_yamls_of_lm_evals_japanese_tasks_score_as_lm_eval_does(tiny, tmp_path):
    """ja_mgsm, ja_jaqket_v2, ja_xlsum and ja_xwinograd against lm-eval's own japanese_leaderboard YAMLs
    on the same local parquet: the same prompts, answers and per-question scores (with a token budget
    too small for the character budget to bind); our YAMLs only add figures and the budget."""
    import lm_eval
    import yaml
    from datasets import Dataset

    model, tokenizer = tiny
    include = tmp_path / "lm_eval"
    include.mkdir()
    upstream_dir = Path(lm_eval.__file__).parent / "tasks" / "japanese_leaderboard"
    for ours, (theirs, splits) in UPSTREAM.items():
        files = {}
        for split in splits:
            files[split] = str(tmp_path / f"{ours}-{split}.parquet")
            # typed like the Hub's files: MGSM's test answers are null in a string column
            features = _jaqket_features() if ours == "ja_jaqket_v2" else Dataset.from_list(upstream_rows(ours, splits[0], 1)).features
            Dataset.from_list(upstream_rows(ours, split, 6 if split == "train" else 3), features=features).to_parquet(
                files[split])
        generation = {} if ours == "ja_xwinograd" else SHORT_GENERATION
        local_task(include, ours, files, **generation)
        (include / f"upstream_{ours}.yaml").write_text(yaml.safe_dump(
            {"include": str(upstream_dir / f"{theirs}.yaml"), "task": f"upstream_{ours}", "dataset_path": "parquet",
             "dataset_name": None, "dataset_kwargs": {"data_files": files}, **generation}, allow_unicode=True))
    names = [name for ours in UPSTREAM for name in (ours, f"upstream_{ours}")]
    output = simple_lm_eval(model, tokenizer, names, include, limit=3)
    shared = {"ja_mgsm": ["acc"], "ja_jaqket_v2": ["exact_match"], "ja_xlsum": [], "ja_xwinograd": ["acc"]}
    for ours, metrics in shared.items():
        mine = sorted(output["samples"][ours], key=lambda s: s["doc_id"])
        theirs = sorted(output["samples"][f"upstream_{ours}"], key=lambda s: s["doc_id"])
        assert len(mine) == len(theirs) == 3
        for a, b in zip(mine, theirs):
            assert a["arguments"] == b["arguments"]  # the same prompt, few-shot examples and choices
            assert a["filtered_resps"] == b["filtered_resps"]
            assert all(a[metric] == b[metric] for metric in metrics)
    results = output["results"]
    assert results["ja_mgsm"]["acc,character_budget"] == results["upstream_ja_mgsm"]["acc,none"]
    assert results["ja_jaqket_v2"]["exact_match,character_budget"] == results["upstream_ja_jaqket_v2"]["exact_match,whitespaces"]
    assert results["ja_xwinograd"]["acc,none"] == results["upstream_ja_xwinograd"]["acc,none"]
    assert results["ja_xlsum"]["rouge2,character_budget"] == pytest.approx(results["upstream_ja_xlsum"]["rouge2,whitespaces"])


def test_wmt20_yamls_score_bleu_as_sacrebleu_and_chrf_per_sentence(tiny, tmp_path):
    from sacrebleu.metrics import BLEU

    model, tokenizer = tiny
    include = tmp_path / "lm_eval"
    include.mkdir()
    rows = [{"id": f"wmt20-{i}", "source": f"The station is {i} minutes away.", "reference": f"駅まで{i}分です。"}
            for i in range(6)]
    data = tmp_path / "en-ja.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    for task in ("ja_wmt20_en_ja", "ja_wmt20_ja_en"):
        local_task(include, task, {"test": str(data)}, num_fewshot=2, **SHORT_GENERATION)
    output = simple_lm_eval(model, tokenizer, ["ja_wmt20_en_ja", "ja_wmt20_ja_en"], include, limit=3)
    for task, tokenize in (("ja_wmt20_en_ja", "ja-mecab"), ("ja_wmt20_ja_en", "13a")):
        samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc"]["id"] for s in samples] == ["wmt20-0", "wmt20-1", "wmt20-2"]
        assert all("The station is" in s["arguments"][0][0] for s in samples)  # 2 shots, then the sentence
        translations = [s["filtered_resps"][0] for s in samples]
        references = [s["doc"]["reference"] for s in samples]
        expected = BLEU(tokenize=tokenize).corpus_score(translations, [references]).score
        assert output["results"][task]["bleu_items,character_budget"] == pytest.approx(expected)
        assert all(0 <= s["chrf"] <= 100 for s in samples)


def test_jemhopqa_yaml_scores_char_f1_on_parquet_in_the_hub_schema(tiny, tmp_path):
    from datasets import Dataset

    model, tokenizer = tiny
    include = tmp_path / "lm_eval"
    include.mkdir()
    files = {}
    for split, count in (("train", 5), ("validation", 3)):
        rows = [{"qid": f"{split}{i}", "type": "compositional", "question": f"『作品{i}』の作者の出身地はどこ？",
                 "answer": "東京都", "derivations": [["作品", "作者", "某"], ["某", "出身地", "東京都"]],
                 "page_ids": [str(i)], "time_dependent": False} for i in range(count)]
        files[split] = str(tmp_path / f"jemhopqa-{split}.parquet")
        Dataset.from_list(rows).to_parquet(files[split])
    local_task(include, "ja_jemhopqa", files, **SHORT_GENERATION)
    output = lm_eval_tasks(model, tokenizer, ["ja_jemhopqa"], include_path=include, limit=3, samples=True)
    assert output["primary"] == {"ja_jemhopqa": "char_f1"}
    assert len(output["samples"]["ja_jemhopqa"]["char_f1"]) == 3
    assert output["results"]["ja_jemhopqa"]["char_f1,character_budget"] == pytest.approx(
        np.mean(output["samples"]["ja_jemhopqa"]["char_f1"]))


def task_folder_module(name):
    """A module of sample_data/tasks/lm_eval (ja_tasks, pin_revisions), imported without leaving the
    folder on sys.path."""
    import importlib

    sys.path.insert(0, str(TASK_YAMLS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TASK_YAMLS))


def niilc_xml(questions):
    """NIILC-ECQA2015's XML schema: <questions><question id><text/><answers><answer/>...</answers><meta/>."""
    parts = ["<?xml version='1.0' encoding=\"UTF-8\"?>\n<questions>"]
    for qid, text, answers in questions:
        parts.append(f'<question id="{qid}">\n  <text>{text}</text>\n  <answers>\n'
                     + "".join(f"    <answer>{answer}</answer>\n" if answer else "    <answer></answer>\n"
                               for answer in answers)
                     + "  </answers>\n  <meta>\n    <B3>地理</B3>\n    <C.1>Select ?x Where { }</C.1>\n"
                       "    <E.5></E.5>\n  </meta>\n</question>")
    return "\n".join(parts + ["</questions>\n"])


NIILC_TEST = [("T-01", "日本で一番長い川は？", ["信濃川"]),
              ("T-02", "日本三名園は？", ["兼六園", "後楽園", "", "偕楽園"]),  # several answers, one empty
              ("T-03", "架空の島の首都は？", ["-"]),  # no answer found: left out
              ("T-04", "富士山がある県は？", ["静岡県", "山梨県"])]


def write_niilc(folder, test=NIILC_TEST):
    dev = [(f"D-{i:02d}", f"架空の町{i}の名産は？", [f"名産{i}"]) for i in range(6)]
    files = {"train": folder / "dev.xml", "test": folder / "test.xml"}
    files["train"].write_text(niilc_xml(dev), encoding="utf-8")
    files["test"].write_text(niilc_xml(test), encoding="utf-8")
    return {split: str(path) for split, path in files.items()}


def test_niilc_loader_reads_the_xml_as_llm_jp_eval_does(tmp_path, caplog):
    ja_tasks = task_folder_module("ja_tasks")
    files = write_niilc(tmp_path)
    with caplog.at_level("WARNING"):
        questions = ja_tasks.niilc_questions(files["test"])
    assert [q["id"] for q in questions] == ["T-01", "T-02", "T-04"]  # "-" left out ...
    assert "1 questions without an answer ('-') left out: T-03" in caplog.text  # ... and counted
    assert questions[1] == {"id": "T-02", "question": "日本三名園は？", "answers": ["兼六園", "後楽園", "偕楽園"]}
    dataset = ja_tasks.load_niilc(files)  # local paths: no download
    assert dataset["train"].num_rows == 6 and dataset["test"].num_rows == 3


def test_niilc_loader_names_the_file_and_line_of_malformed_xml(tmp_path):
    ja_tasks = task_folder_module("ja_tasks")
    broken = tmp_path / "test.xml"
    broken.write_text("<?xml version='1.0'?>\n<questions>\n<question id=\"x\">\n  <text>質問</text>\n"
                      "  <answers><answer>答え</answers>\n</question>\n</questions>\n", encoding="utf-8")
    with pytest.raises(ja_tasks.TaskDataError, match=r"test\.xml:5: not well-formed XML"):
        ja_tasks.niilc_questions(broken)
    broken.write_text("<questions><question id=\"q1\"><text>質問</text></question></questions>", encoding="utf-8")
    with pytest.raises(ja_tasks.TaskDataError, match=r"test\.xml: q1: no <answer>"):
        ja_tasks.niilc_questions(broken)


def test_niilc_yaml_scores_char_f1_on_xml_in_the_upstream_schema(tiny, tmp_path):
    model, tokenizer = tiny
    include = tmp_path / "lm_eval"
    include.mkdir()
    local_task(include, "ja_niilc", write_niilc(tmp_path), **SHORT_GENERATION)
    output = lm_eval_tasks(model, tokenizer, ["ja_niilc"], include_path=include, samples=True)
    assert output["primary"] == {"ja_niilc": "char_f1"}
    assert len(output["samples"]["ja_niilc"]["char_f1"]) == 3
    assert output["results"]["ja_niilc"]["char_f1,character_budget"] == pytest.approx(
        np.mean(output["samples"]["ja_niilc"]["char_f1"]))
    assert "exact_match,character_budget" in output["results"]["ja_niilc"]
    task = lm_eval_task_manager_for(["ja_niilc"], include).load_task_or_group(["ja_niilc"])["ja_niilc"]
    assert [task.doc_to_target(doc) for doc in task.test_docs()] == ["信濃川", "兼六園,後楽園,偕楽園", "静岡県,山梨県"]
    assert output["data_revisions"] == {}  # local files: no revision to record


JMMLU_TOPICS = {"high_school_mathematics": "二次関数", "japanese_history": "鎌倉時代"}
JMMLU_SUBJECTS = tuple(JMMLU_TOPICS)


def jmmlu_csv(subject, count):
    """Rows as JMMLU's CSVs hold them: a UTF-8 BOM, no header, question, A, B, C, D, answer letter;
    quoted fields with commas and a line break. Synthetic rows (JMMLU itself is not copied)."""
    rows = []
    for i in range(count):
        question = f"{JMMLU_TOPICS.get(subject, '人体')}の問{i}：次のうち、正しいものはどれか。" + ("\n（二行目）" if i == 1 else "")
        rows.append([question, f"選択肢{i}A", f"甲、乙, 丙{i}", f"選択肢{i}C", f"選択肢{i}D", "ABCD"[i % 4]])
    buffer = io.StringIO()
    csv.writer(buffer, quoting=csv.QUOTE_MINIMAL).writerows(rows)
    return "\ufeff" + buffer.getvalue()


def write_jmmlu(folder, count=7):
    files = {}
    for subject in JMMLU_SUBJECTS:
        files[subject] = str(folder / f"{subject}.csv")
        Path(files[subject]).write_text(jmmlu_csv(subject, count), encoding="utf-8", newline="")
    return files


def test_jmmlu_loader_reads_the_csvs_and_keeps_five_shots_per_subject_out_of_the_test(tmp_path):
    ja_tasks = task_folder_module("ja_tasks")
    files = write_jmmlu(tmp_path)
    questions = ja_tasks.jmmlu_questions(files["japanese_history"], "japanese_history")
    assert len(questions) == 7
    assert questions[0]["question"] == "鎌倉時代の問0：次のうち、正しいものはどれか。"  # no BOM in the text
    assert questions[1]["question"].endswith("\n（二行目）") and questions[1]["choices"][1] == "甲、乙, 丙1"
    assert [q["label"] for q in questions[:4]] == [0, 1, 2, 3] and questions[0]["subject_ja"] == "日本史"
    dataset = ja_tasks.load_jmmlu(files)
    assert dataset["train"]["id"] == [f"{s}-{i}" for s in JMMLU_SUBJECTS for i in range(5)]
    assert dataset["test"]["id"] == [f"{s}-{i}" for s in JMMLU_SUBJECTS for i in (5, 6)]


def test_jmmlu_loader_names_the_file_and_line_of_a_bad_row(tmp_path):
    ja_tasks = task_folder_module("ja_tasks")
    path = tmp_path / "anatomy.csv"
    good = jmmlu_csv("anatomy", 2)  # the second record spans lines 2-3
    path.write_text(good + "問,A,B,C,D\n", encoding="utf-8", newline="")
    with pytest.raises(ja_tasks.TaskDataError, match=r"anatomy\.csv:4: 5 columns, expected 6"):
        ja_tasks.jmmlu_questions(path, "anatomy")
    path.write_text(good + "問,A,B,C,D,E\n", encoding="utf-8", newline="")
    with pytest.raises(ja_tasks.TaskDataError, match=r"anatomy\.csv:4: answer 'E'"):
        ja_tasks.jmmlu_questions(path, "anatomy")


def test_jmmlu_yaml_scores_accuracy_with_shots_from_the_same_subject(tiny, tmp_path):
    model, tokenizer = tiny
    include = tmp_path / "lm_eval"
    include.mkdir()
    local_task(include, "ja_jmmlu", write_jmmlu(tmp_path))
    output = lm_eval_tasks(model, tokenizer, ["ja_jmmlu"], include_path=include, samples=True)
    assert output["primary"] == {"ja_jmmlu": "acc"}
    accuracy = output["samples"]["ja_jmmlu"]["acc"]
    assert len(accuracy) == 4 and set(accuracy) <= {0.0, 1.0}
    assert output["results"]["ja_jmmlu"]["acc,none"] == pytest.approx(np.mean(accuracy))
    task = lm_eval_task_manager_for(["ja_jmmlu"], include).load_task_or_group(["ja_jmmlu"])["ja_jmmlu"]
    assert type(task.sampler).__name__ == "SameSubjectSampler"
    for doc in task.test_docs():
        shots = task.sampler.sample(5, eval_doc=doc)
        assert [shot["id"] for shot in shots] == [f"{doc['subject']}-{i}" for i in range(5)]  # MMLU's first 5
        context = task.fewshot_context(doc, 5)
        assert context.startswith(f"以下は、{doc['subject_ja']}に関する多肢選択問題です。") and context.endswith("\n答え：")
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]


def test_lm_eval_records_the_data_revision_of_each_task():
    from toolkit.evaluation import lm_eval_data_revisions

    configs = shipped_task_configs()
    revisions = lm_eval_data_revisions({name: config for name, config in configs.items() if name != "ja_swallow"})
    # offline (the tests): a moving ref is recorded with an unknown commit, a pinned one with its commit
    assert revisions["ja_jglue_jnli"] == [{"source": "hf://datasets/shunk031/JGLUE", "revision": "refs/convert/parquet",
                                           "commit": None}]
    assert revisions["ja_jemhopqa"][0]["commit"] == "3996f8af9177cbac265f2bb5f04d42941034a751"
    assert revisions["ja_niilc"] == [{"source": "https://github.com/mynlp/niilc-qa",
                                      "revision": "b6d47968b2e301a5e953fb1922a08ed56099646b",
                                      "commit": "b6d47968b2e301a5e953fb1922a08ed56099646b"}]
    assert revisions["ja_jmmlu"][0]["commit"] == "762cbf192c9e4588b574d718f95afd64c96fcbf4"
    assert "ja_wmt20_en_ja" not in revisions  # sacrebleu's files: pinned by the package version
    hub_tasks = [name for name, config in configs.items() if "hf://" in json.dumps(config.get("dataset_kwargs"))]
    assert set(hub_tasks) <= set(revisions)


@pytest.fixture
def local_hub(monkeypatch):
    """A local stand-in for the Hub's dataset API, as huggingface_hub asks it: `refs` {(repo, ref): commit}
    answers GET /api/datasets/REPO/revision/REF (dataset_info), `files` {(repo, commit): {path}} answers
    POST /api/datasets/REPO/paths-info/COMMIT (get_paths_info: the asked paths that exist); anything else
    is 404. `asked`: (method, path, the paths asked about)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace
    from urllib.parse import parse_qs, unquote

    from huggingface_hub import constants

    from toolkit.evaluation import resolve_hub_dataset_revision

    hub = SimpleNamespace(refs={}, files={}, asked=[])

    class Hub(BaseHTTPRequestHandler):
        def answer(self, method):
            form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
            hub.asked.append((method, self.path, tuple(form.get("paths", ()))))
            info = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^/?]+)", self.path)
            paths_info = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/?]+)", self.path)
            status, payload, error_code = 404, {"error": "not found"}, "RepoNotFound"
            if method == "GET" and info and (info[1], unquote(info[2])) in hub.refs:
                status, payload = 200, {"id": info[1], "sha": hub.refs[(info[1], unquote(info[2]))]}
            elif method == "POST" and paths_info and (paths_info[1], unquote(paths_info[2])) in hub.files:
                present = hub.files[(paths_info[1], unquote(paths_info[2]))]
                status, payload = 200, [{"type": "file", "path": path, "size": 1, "oid": "0" * 40}
                                        for path in form["paths"] if path in present]
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 404:
                self.send_header("X-Error-Code", error_code)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.answer("GET")

        def do_POST(self):
            self.answer("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    resolve_hub_dataset_revision.cache_clear()
    yield hub
    server.shutdown()
    server.server_close()
    resolve_hub_dataset_revision.cache_clear()


def test_a_moving_ref_is_recorded_with_the_commit_the_hub_resolves_it_to(local_hub, caplog):
    """Online: refs/convert/parquet is asked of the Hub (here a local stand-in) and its commit recorded."""
    from toolkit.evaluation import lm_eval_data_revisions

    local_hub.refs[("shunk031/JGLUE", "refs/convert/parquet")] = "ab" * 20
    configs = shipped_task_configs()
    revisions = lm_eval_data_revisions({"ja_jglue_jnli": configs["ja_jglue_jnli"],
                                        "gone": {"dataset_kwargs": {"data_files": "hf://datasets/o/gone@main/x.parquet"}}})
    assert revisions["ja_jglue_jnli"] == [{"source": "hf://datasets/shunk031/JGLUE", "revision": "refs/convert/parquet",
                                           "commit": "ab" * 20}]
    assert len([path for _, path, _ in local_hub.asked if "JGLUE" in path]) == 1  # train and validation: one question
    assert revisions["gone"][0]["commit"] is None and "could not resolve hf://datasets/o/gone@main" in caplog.text


# ----- pin_revisions.py: every moving ref of the task YAMLs rewritten with its commit -----------------
JGLUE_COMMIT = "c0ffee" + "0" * 34
MOVING = b"@refs%2Fconvert%2Fparquet/"


def copy_yamls(folder, *names):
    """{name: original bytes} of the shipped YAMLs copied into `folder`."""
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(TASK_YAMLS / f"{name}.yaml", folder / f"{name}.yaml")
    return {name: (folder / f"{name}.yaml").read_bytes() for name in names}


def yaml_bytes(folder):
    return {path.stem: path.read_bytes() for path in sorted(folder.glob("*.yaml"))}


def serve_jglue(hub, *configs, leave_out=()):
    hub.refs[("shunk031/JGLUE", "refs/convert/parquet")] = JGLUE_COMMIT
    hub.files[("shunk031/JGLUE", JGLUE_COMMIT)] = {f"{config}/{split}/0000.parquet" for config in configs
                                                   for split in ("train", "validation")} - set(leave_out)


def test_pin_revisions_rewrites_only_the_moving_ref(local_hub, tmp_path, capsys):
    from toolkit.evaluation import lm_eval_data_revisions

    pin_revisions = task_folder_module("pin_revisions")
    original = copy_yamls(tmp_path / "tasks", "ja_jglue_jnli", "ja_jemhopqa")
    pinned_inode = (tmp_path / "tasks/ja_jemhopqa.yaml").stat().st_ino
    serve_jglue(local_hub, "JNLI")

    pin_revisions.main(["--tasks_dir", str(tmp_path / "tasks")])

    after = yaml_bytes(tmp_path / "tasks")
    assert original["ja_jglue_jnli"].count(MOVING) == 2
    # outside the two refs every byte is the same (comments, order, quoting, the Japanese prompts)
    assert after["ja_jglue_jnli"].split(f"@{JGLUE_COMMIT}/".encode()) == original["ja_jglue_jnli"].split(MOVING)
    assert after["ja_jemhopqa"] == original["ja_jemhopqa"]
    assert (tmp_path / "tasks/ja_jemhopqa.yaml").stat().st_ino == pinned_inode  # not even rewritten
    assert [(path, paths) for method, path, paths in local_hub.asked if method == "POST"] == [
        (f"/api/datasets/shunk031/JGLUE/paths-info/{JGLUE_COMMIT}",
         ("JNLI/train/0000.parquet", "JNLI/validation/0000.parquet"))]  # both files, checked at the commit
    assert not [path for _, path, _ in local_hub.asked if "JEMHopQA" in path]  # a commit is not asked again
    table = capsys.readouterr().out
    assert re.search(rf"ja_jglue_jnli +shunk031/JGLUE +refs/convert/parquet -> {JGLUE_COMMIT} +2\n", table)
    assert "already pinned: sbintuitions/JEMHopQA@3996f8af9177" in table
    # what the ablation's report then records: the commit, without asking the Hub
    configs = shipped_task_configs(tmp_path / "tasks")
    assert lm_eval_data_revisions({"ja_jglue_jnli": configs["ja_jglue_jnli"]}) == {"ja_jglue_jnli": [
        {"source": "hf://datasets/shunk031/JGLUE", "revision": JGLUE_COMMIT, "commit": JGLUE_COMMIT}]}

    # pinned now: a second run has nothing to ask and changes nothing
    local_hub.asked.clear()
    pin_revisions.main(["--tasks_dir", str(tmp_path / "tasks")])
    assert yaml_bytes(tmp_path / "tasks") == after and local_hub.asked == []
    assert "nothing to pin" in capsys.readouterr().out


def test_pin_revisions_pins_every_shipped_yaml(local_hub, tmp_path):
    from toolkit.evaluation import lm_eval_data_revisions

    original = copy_yamls(tmp_path / "tasks", *(path.stem for path in TASK_YAMLS.glob("*.yaml")))
    moving = {(repo, path) for text in original.values()
              for repo, path in re.findall(r"hf://datasets/([^@\s]+)@refs%2Fconvert%2Fparquet/(\S+)", text.decode())}
    assert {repo for repo, _ in moving} == {"shunk031/JGLUE", "mkshing/xlsum_ja", "juletxara/mgsm", "kumapo/JAQKET",
                                            "polm-stability/xwinograd-ja"}
    for number, repo in enumerate(sorted({repo for repo, _ in moving})):
        local_hub.refs[(repo, "refs/convert/parquet")] = f"{number:040x}"
        local_hub.files[(repo, f"{number:040x}")] = {path for named, path in moving if named == repo}

    task_folder_module("pin_revisions").main(["--tasks_dir", str(tmp_path / "tasks")])

    after = yaml_bytes(tmp_path / "tasks")
    assert not [name for name, text in after.items() if b"@refs%2F" in text]
    revisions = lm_eval_data_revisions(shipped_task_configs(tmp_path / "tasks"))
    assert revisions and all(found["revision"] == found["commit"] for task in revisions.values() for found in task)
    changed = {name for name in original if after[name] != original[name]}
    assert changed == {name for name, text in original.items() if b"@refs%2F" in text}


def test_pin_revisions_dry_run_writes_nothing(local_hub, tmp_path, capsys):
    original = copy_yamls(tmp_path / "tasks", "ja_jglue_jnli", "ja_jemhopqa")
    serve_jglue(local_hub, "JNLI")

    task_folder_module("pin_revisions").main(["--tasks_dir", str(tmp_path / "tasks"), "--dry_run"])

    assert yaml_bytes(tmp_path / "tasks") == original
    assert sorted(path.name for path in (tmp_path / "tasks").iterdir()) == ["ja_jemhopqa.yaml", "ja_jglue_jnli.yaml"]
    out = capsys.readouterr().out
    assert f"refs/convert/parquet -> {JGLUE_COMMIT}" in out and "dry run: 1 YAMLs would change, nothing written" in out


def test_pin_revisions_names_the_yaml_and_line_of_a_file_missing_at_the_commit(local_hub, tmp_path):
    # JCommonsenseQA resolves and exists; JNLI (written after it, in name order) lacks its validation file
    original = copy_yamls(tmp_path / "tasks", "ja_jglue_jcommonsenseqa", "ja_jglue_jnli", "ja_jemhopqa")
    serve_jglue(local_hub, "JCommonsenseQA", "JNLI", leave_out={"JNLI/validation/0000.parquet"})
    line = next(number for number, text in enumerate(original["ja_jglue_jnli"].decode().splitlines(), 1)
                if "JNLI/validation" in text)

    with pytest.raises(SystemExit) as exited:
        task_folder_module("pin_revisions").main(["--tasks_dir", str(tmp_path / "tasks")])

    message = str(exited.value.code)
    url = "hf://datasets/shunk031/JGLUE@refs%2Fconvert%2Fparquet/JNLI/validation/0000.parquet"
    assert f"ja_jglue_jnli.yaml:{line}: {url}: no file JNLI/validation/0000.parquet at commit {JGLUE_COMMIT}" in message
    assert "JCommonsenseQA" not in message and "nothing was changed" in message
    assert yaml_bytes(tmp_path / "tasks") == original
    assert sorted(path.name for path in (tmp_path / "tasks").iterdir()) == sorted(f"{name}.yaml" for name in original)


def test_pin_revisions_names_the_yaml_and_line_of_a_ref_the_hub_does_not_know(local_hub, tmp_path):
    original = copy_yamls(tmp_path / "tasks", "ja_jglue_jnli", "ja_xwinograd")
    serve_jglue(local_hub, "JNLI")  # xwinograd-ja: not on this Hub

    with pytest.raises(SystemExit) as exited:
        task_folder_module("pin_revisions").main(["--tasks_dir", str(tmp_path / "tasks")])

    line = next(number for number, text in enumerate(original["ja_xwinograd"].decode().splitlines(), 1)
                if "hf://" in text)
    message = str(exited.value.code)
    assert re.match(rf"error: \S+/ja_xwinograd\.yaml:{line}: hf://datasets/polm-stability/xwinograd-ja"
                    r"@refs%2Fconvert%2Fparquet/default/test/0000\.parquet: the Hub answers RepositoryNotFoundError",
                    message)
    assert "nothing was changed" in message and yaml_bytes(tmp_path / "tasks") == original


@pytest.mark.parametrize("why", ["HF_HUB_OFFLINE", "connection refused"])
def test_pin_revisions_without_the_hub_changes_nothing_and_says_so(monkeypatch, tmp_path, why):
    import socket

    from huggingface_hub import constants

    from toolkit.evaluation import resolve_hub_dataset_revision

    original = copy_yamls(tmp_path / "tasks", "ja_jglue_jnli", "ja_jemhopqa")
    with socket.socket() as closed:  # a port nothing listens on once closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", why == "HF_HUB_OFFLINE")
    resolve_hub_dataset_revision.cache_clear()

    with pytest.raises(SystemExit) as exited:
        task_folder_module("pin_revisions").main(["--tasks_dir", str(tmp_path / "tasks")])

    message = str(exited.value.code)
    assert message.startswith(f"error: cannot reach the Hub (http://127.0.0.1:{port}): ")
    assert "nothing was changed" in message and "\n" not in message
    assert (why in message) if why == "HF_HUB_OFFLINE" else ("Connection refused" in message)
    assert yaml_bytes(tmp_path / "tasks") == original


def test_contamination_and_decontamination_read_niilc_and_jmmlu_items(tmp_path):
    from toolkit.decontamination import lm_eval_task_items, materialize_lm_eval_tasks

    include = tmp_path / "lm_eval"
    include.mkdir()
    local_task(include, "ja_niilc", write_niilc(tmp_path))
    local_task(include, "ja_jmmlu", write_jmmlu(tmp_path))
    items = lm_eval_task_items(["ja_niilc", "ja_jmmlu"], include)
    assert items["ja_niilc"][1] == "日本三名園は？\n兼六園\n後楽園\n偕楽園"  # the question and its answers
    assert len(items["ja_jmmlu"]) == 4 and "選択肢5A" in items["ja_jmmlu"][0]
    assert not any("japanese_history" in item or "日本史" in item for item in items["ja_jmmlu"])  # bookkeeping
    files = materialize_lm_eval_tasks(["lm_eval:ja_niilc", "ja_jmmlu"], tmp_path / "decontamination", include)
    assert [Path(path).name for path in files] == ["ja_niilc.jsonl", "ja_jmmlu.jsonl"]
    assert len(Path(files[1]).read_text(encoding="utf-8").splitlines()) == 4


def simple_lm_eval(model, tokenizer, names, include, limit):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    return simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=names,
                           task_manager=lm_eval_task_manager_for(names, include), limit=limit, log_samples=True,
                           bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0)


def shipped_task_configs(folder=TASK_YAMLS):
    """{task: its YAML} for every task YAML shipped in sample_data/tasks/lm_eval/ (!function kept as text)."""
    import yaml

    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    configs = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        configs[path.stem] = config
    return configs


def test_every_shipped_task_says_its_harness_primary_metric_and_character_budget():
    from toolkit.evaluation import token_cap

    configs = shipped_task_configs()
    group = configs.pop("ja_swallow")
    assert set(group["task"]) <= set(configs)  # `--tasks ja_swallow` names only shipped tasks
    for name, config in configs.items():
        text = (TASK_YAMLS / f"{name}.yaml").read_text(encoding="utf-8")
        assert "Follows" in text or "(not a public" in text, name  # which harness, and where it differs
        assert config["metadata"]["primary_metric"], name
        if config["output_type"] == "generate_until":  # the budget in characters; tokens only a safety cap
            steps = [step for f in config["filter_list"] for step in f["filter"]]
            budget = next(step["max_characters"] for step in steps if "FirstCharacters" in str(step["function"]))
            assert config["generation_kwargs"]["max_gen_toks"] == token_cap(budget), name


def test_the_ja_swallow_group_resolves_to_its_tasks():
    manager = lm_eval_task_manager_for(["ja_swallow"], TASK_YAMLS)
    assert "ja_swallow" in manager.all_groups
    assert {"ja_jglue_jsquad", "ja_mgsm", "ja_wmt20_en_ja", "ja_xwinograd", "ja_niilc", "ja_jmmlu"} <= set(
        manager.all_subtasks)
