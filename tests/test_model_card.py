import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from toolkit import model_card as mc
from toolkit.embeddings import INITS

FIXTURES = Path(__file__).parent / "fixtures" / "reports"
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def render(root, repo_id="your-org/smollm2-135m-ja-demo", config=None):
    facts = mc.collect_facts(mc.load_reports(mc.find_reports([root])))
    return mc.render_card(facts, config or mc.load_card_config(), repo_id)


@pytest.fixture
def reports(tmp_path):
    root = tmp_path / "reports"
    shutil.copytree(FIXTURES, root)
    return root


def edit(path, **changes):
    report = json.loads(path.read_text())
    report.update(changes)
    path.write_text(json.dumps(report))


def test_card_has_both_languages_with_the_same_numbers(reports):
    card = render(reports)
    english, japanese = mc.split_languages(card)
    assert "## English" in english and "## 日本語" in japanese
    assert "継続事前学習" in japanese and "トークナイザー" in japanese and "謝辞" in japanese
    # Same facts: every number of one section appears as often in the other.
    assert Counter(NUMBER.findall(english)) == Counter(NUMBER.findall(japanese))
    # And those numbers are the reports' figures, formatted once.
    for figure in ["49,152", "53,248", "4,096", "1,081,350", "120,150", "90.0%", "10.0%", "1,480", "600",
                   "1,873,402", "30,720", "0.91", "1.73", "1.90x", "+0.0560", "[+0.0120, +0.1010]", "ZeRO-3"]:
        assert figure in english and figure in japanese, figure


def test_card_metadata_is_valid_model_card_data(reports):
    card = ModelCard(render(reports))
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["language"] == ["en", "ja"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # from the training report's offline name
    assert "japanese" in data["tags"]
    assert "datasets" not in data  # the fixture selection read local files: no Hub dataset to name


def test_hub_inputs_become_datasets_metadata(reports):
    cached = "/root/.cache/huggingface/hub/datasets--allenai--MADLAD-400/snapshots/abc/data/ja/ja_clean_0000.jsonl.gz"
    edit(reports / "selection" / "selection_report.json",
         inputs={"raw_datasets": [{"path": cached, "bytes": 1}], "target_datasets": ["hf://datasets/org/target/x.jsonl"],
                 "hub_dataset": "allenai/MADLAD-400"})
    data = ModelCard(render(reports)).data
    assert data.datasets == ["allenai/MADLAD-400", "org/target"]
    english, japanese = mc.split_languages(render(reports))
    assert "MADLAD-400 authors" in english and "MADLAD-400 を公開した" in japanese
    config = mc.load_card_config(overrides={"datasets": ["my-org/english-mix"]})
    assert ModelCard(render(reports, config=config)).data.datasets == ["my-org/english-mix", "allenai/MADLAD-400",
                                                                       "org/target"]


def test_missing_reports_leave_their_sections_out(reports):
    shutil.rmtree(reports / "tokenizer")
    (reports / "ablation" / "ablation_results.json").unlink()
    card = render(reports)
    english, japanese = mc.split_languages(card)
    assert "tokenizer_report.json" in english and "tokenizer_report.json" in japanese
    assert "ablation_results.json" in english and "ablation_results.json" in japanese
    for figure in ["53,248", "4,096", "1.73", "passage_continuation"]:  # nothing from the missing reports
        assert figure not in card
    assert "| Japanese | 1,081,350 |" in english  # the other sections stay
    assert Counter(NUMBER.findall(english)) == Counter(NUMBER.findall(japanese))


def test_no_reports_at_all_still_renders_a_valid_card(tmp_path):
    card = render(tmp_path)
    english, japanese = mc.split_languages(card)
    assert "unknown" in english and "不明" in japanese  # EOS: not claimed either way
    assert ModelCard(card).data.license == "apache-2.0"
    assert Counter(NUMBER.findall(english)) == Counter(NUMBER.findall(japanese))


def test_missing_keys_inside_a_report_omit_only_what_is_missing(reports):
    path = reports / "tokenizer" / "tokenizer_report.json"
    report = json.loads(path.read_text())
    del report["characters_per_token"]
    path.write_text(json.dumps(report))
    english, _ = mc.split_languages(render(reports))
    assert "53,248" in english and "Extended / base" not in english
    edit(reports / "pretrain" / "training_report.json", tokens_seen="lots", steps=None)
    assert mc.training_facts(json.loads((reports / "pretrain" / "training_report.json").read_text())) is None


def test_eos_statement_follows_the_training_report(reports):
    english, japanese = mc.split_languages(render(reports))
    assert "EOS **was trained**" in english and "EOS は**学習済み**" in japanese
    edit(reports / "pretrain" / "training_report.json", eos_appended=False)
    english, japanese = mc.split_languages(render(reports))
    assert "EOS **was not trained**" in english and "EOS は**学習していません**" in japanese


def test_ablation_reading_respects_metric_direction():
    facts = mc.ablation_facts({"models": ["base", "ext"], "tasks": [
        {"name": "a", "metric": "accuracy", "scores": {"base": 0.1, "ext": 0.2}, "difference": 0.1, "ci95": [0.05, 0.15]},
        {"name": "b", "metric": "bits_per_character", "scores": {"base": 2, "ext": 1.9}, "difference": -0.1, "ci95": [-0.2, -0.01]},
        {"name": "c", "metric": "accuracy", "scores": {"base": 0.1, "ext": 0.0}, "difference": -0.1, "ci95": [-0.2, -0.05]},
        {"name": "d", "metric": "accuracy", "scores": {"base": 0.1, "ext": 0.1}, "difference": 0.0, "ci95": [-0.1, 0.1]},
    ]})
    assert [task["comparisons"][0]["outcome"] for task in facts["tasks"]] == ["better", "better", "worse", "noise"]


def test_ablation_with_several_models_compares_each_to_the_baseline():
    facts = mc.ablation_facts({
        "models": [{"name": "raw"}, {"name": "ext"}, {"name": "ext2"}], "baseline": "raw",
        "metrics": [{"task": "t", "metric": "accuracy", "higher_is_better": True,
                     "values": {"raw": 0.5, "ext": 0.6, "ext2": 0.4},
                     "differences": {"ext": {"difference": 0.1, "ci95": [0.02, 0.2], "verdict": "better"},
                                     "ext2": {"difference": -0.1, "ci95": [-0.2, 0.01], "verdict": "within noise"}}}]})
    assert facts["compared"] == ["ext", "ext2"] and facts["tasks"][0]["scores"] == [0.5, 0.6, 0.4]
    assert [c["outcome"] for c in facts["tasks"][0]["comparisons"]] == ["better", "noise"]
    config = mc.load_card_config()
    card = mc.render_card({"ablation": facts}, config, "o/m")
    english, japanese = mc.split_languages(card)
    # an identifier the translation table lacks ("t") shows as code in both halves
    # a report without item counts says so (n/a) rather than leaving the column out
    assert "| `t` | accuracy | n/a | 0.5000 | 0.6000 | 0.4000 | +0.1000 | [+0.0200, +0.2000] | better | -0.1000 |" in english
    assert "| `t` | 正解率 | n/a | 0.5000 | 0.6000 | 0.4000 | +0.1000 | [+0.0200, +0.2000] | 改善 | -0.1000 |" in japanese
    assert "ext2 − raw" in card
    assert "ext vs raw: better on 1 of 1 figures (`t`: accuracy), worse on 0, within noise on the rest." in english
    assert "ext2 と raw の比較: 1 個の指標のうち 0 個で改善、0 個で悪化、残りは誤差の範囲内でした。" in japanese


def test_three_arm_reading_names_each_effect_and_the_arms_it_compares():
    """Named effects compare arms with each other (tokenizer = extended - continued), so the
    reading must not say "extended vs base"."""
    facts = mc.ablation_facts({
        "models": [{"name": "base"}, {"name": "continued"}, {"name": "extended"}], "baseline": "base",
        "effects": [{"name": "data", "minuend": "continued", "subtrahend": "base"},
                    {"name": "tokenizer", "minuend": "extended", "subtrahend": "continued"}],
        "metrics": [{"task": "heading_mc", "metric": "accuracy", "primary": True, "higher_is_better": True,
                     "values": {"base": 0.5, "continued": 0.6, "extended": 0.4},
                     "effects": {"data": {"difference": 0.1, "ci95": [0.02, 0.2], "p_holm": 0.01, "verdict": "better"},
                                 "tokenizer": {"difference": -0.2, "ci95": [-0.3, -0.1], "p_holm": 0.02,
                                               "verdict": "worse"}}}]})
    english, japanese = mc.ablation_verdict(facts, "en"), mc.ablation_verdict(facts, "ja")
    assert english.startswith("data effect (continued − base): better on 1 of 1 figures")
    assert "tokenizer effect (extended − continued): better on 0 of 1 figures, worse on 1" in english
    assert "extended vs base" not in english
    # the Japanese half names the three-arm recipe's arms in Japanese (TERMS)
    assert japanese.startswith("データの効果（継続事前学習モデル − ベースモデル）: 1 個の指標のうち 1 個で改善")
    assert "トークナイザーの効果（語彙拡張モデル − 継続事前学習モデル）: 1 個の指標のうち 0 個で改善、1 個で悪化" in japanese


def test_user_fields_from_yaml_and_cli(reports, tmp_path):
    config_file = tmp_path / "card.yaml"
    config_file.write_text(
        "authors: [Jane Doe]\n"
        "sponsor: {en: 'Compute sponsored by ACME.', ja: '計算資源は ACME から提供されました。'}\n"
        "hardware_description: {en: '1 node, 16 x A100-40GB', ja: 'A100-40GB 16 基（1 ノード）'}\n"
    )
    config = mc.load_card_config(config_file, {"model_name": "My JA Model", "authors": None})
    english, japanese = mc.split_languages(render(reports, config=config))
    assert "# My JA Model" in render(reports, config=config)
    assert "Jane Doe" in english and "Jane Doe" in japanese
    assert "Compute sponsored by ACME." in english and "計算資源は ACME から提供されました。" in japanese
    assert "1 node, 16 x A100-40GB" in english and "A100-40GB 16 基" in japanese
    assert "2 x cpu" not in english  # the user's hardware line replaces the report's
    config_file.write_text("author: typo\n")
    with pytest.raises(ValueError, match="unknown card field.*author"):
        mc.load_card_config(config_file)


def test_find_reports_prefers_demo_layout_then_searches(tmp_path):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "training_report.json").write_text("{}")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "training_report.json").write_text("{}")
    (tmp_path / "deep" / "er" / "mix_report.json").write_text("{}")
    found = mc.find_reports([tmp_path])
    assert found["training"] == tmp_path / "pretrain" / "training_report.json"
    assert found["mix"] == tmp_path / "deep" / "er" / "mix_report.json"
    assert "selection" not in found


def test_unreadable_report_names_the_file(reports):
    (reports / "mix" / "mix_report.json").write_text("{not json")
    with pytest.raises(ValueError, match="mix_report.json:1"):
        mc.load_reports(mc.find_reports([reports]))


def test_committed_example_card_is_valid_and_bilingual():
    text = (Path(__file__).resolve().parents[1] / "model_card" / "example" / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and card.data.language == ["en", "ja"]
    english, japanese = mc.split_languages(text)
    assert Counter(NUMBER.findall(english)) == Counter(NUMBER.findall(japanese))


def test_training_claims_only_what_the_report_says(reports):
    path = reports / "pretrain" / "training_report.json"
    report = json.loads(path.read_text())
    for key in ("zero_stage", "eos_appended"):
        del report[key]
    path.write_text(json.dumps(report))
    english, japanese = mc.split_languages(render(reports))
    assert "DeepSpeed" not in english and "DeepSpeed" not in japanese
    assert "EOS is **unknown**" not in english and "**unknown**" in english and "**不明**" in japanese
    report["distributed_type"] = "DistributedType.DEEPSPEED"
    path.write_text(json.dumps(report))
    english, japanese = mc.split_languages(render(reports))
    assert "and DeepSpeed." in english and "ZeRO" not in english and "DeepSpeed で" in japanese


# ----------------------------------------------------------------------------- issue 13: the card's text
ASCII_IDENTIFIER = re.compile(r"(?<!`)\b[a-z]+(?:_[a-z0-9]+)+\b(?!`)")  # heading_mc, ... (not `quoted` code)


def test_japanese_half_translates_every_task_and_metric_and_the_verdict(reports):
    english, japanese = mc.split_languages(render(reports))
    for section in ("### アブレーション", "### 学習"):
        block = japanese.split(section, 1)[1].split("\n### ", 1)[0]
        assert ASCII_IDENTIFIER.findall(block) == [], section
    assert "文章の続きの選択（多肢選択）" in japanese and "文字あたりのビット数（日本語）" in japanese
    assert ("結果の読み方: extended と base の比較: 3 個の指標のうち 2 個で改善（文章の続きの選択（多肢選択）の正解率、"
            "日本語の評価用テキストの文字あたりのビット数）") in japanese
    assert ("Reading: extended vs base: better on 2 of 3 figures (text continuation (multiple choice): accuracy; "
            "held-out Japanese text: bits per character)") in english
    assert "原文は英語" not in japanese


def test_every_task_and_metric_the_toolkit_produces_is_in_the_one_table():
    """Task files bundled in sample_data/tasks, lm-eval YAMLs, the held-out sets and every metric name."""
    tasks = {path.stem for path in (mc.REPO_ROOT / "sample_data" / "tasks").glob("*.jsonl")}
    tasks |= {"lm_eval:" + line.split(":", 1)[1].strip()
              for path in (mc.REPO_ROOT / "sample_data" / "tasks" / "lm_eval").glob("*.yaml")
              for line in path.read_text(encoding="utf-8").splitlines()
              if line.startswith("task:") and line.split(":", 1)[1].strip()}  # a group's `task:` is a list
    metrics = {"bits_per_character", "bits_per_byte", "accuracy", "acc", "acc_norm", "exact_match", "char_f1",
               "char_rouge_l", "loss", "characters_per_token", "stops_with_eos",
               # the lm-eval task YAMLs' primary metrics (metadata.primary_metric)
               "balanced_acc", "macro_f1", "rouge2_f", "chrf"}
    names = tasks | metrics | set(INITS) | {"heldout_ja", "heldout_en", "data", "tokenizer", "better", "worse", "within noise"}
    assert len(tasks) >= 5
    assert sorted(name for name in names if name not in mc.TERMS) == []
    assert all(set(entry) == {"en", "ja"} and all(entry.values()) for entry in mc.TERMS.values())


def test_table_called_comparable_holds_only_tokenizer_independent_figures(reports):
    english, japanese = mc.split_languages(render(reports))
    comparable = english.split("comparable across tokenizers (lower is better):", 1)[1].split("\n\n", 2)[1]
    assert "bits per character (Japanese)" in comparable and "loss" not in comparable
    per_token = english.split("**not** comparable", 1)[1].split("\n\n", 2)[1]
    assert "| loss per token (Japanese) | 3.6110 | 3.4120 |" in per_token
    assert "トークンあたりの損失（日本語）" not in japanese.split("比較できます", 1)[1].split("\n\n", 2)[1]


def test_hardware_lines_make_sense_on_cpu(reports):
    english, japanese = mc.split_languages(render(reports))  # the fixture run: 2 CPU processes, gpu_hours 0.0
    assert "GPU-hours" not in english and "GPU 時間" not in japanese
    assert "- Hardware: CPU only (2 processes, no GPU)" in english
    assert "- ハードウェア: CPU のみ（2 プロセス、GPU なし）" in japanese
    training = mc.read_json(reports / "pretrain" / "training_report.json")
    training.update(device="cuda", processes=8, gpu_hours=12.5)
    facts = mc.training_facts(training)
    assert facts["gpu_hours"] == 12.5 and facts["hardware"] == "8 x cuda"


@pytest.mark.parametrize("base, expected", [
    ("offline:smollm2-135m", "instruct"), ("HuggingFaceTB/SmolLM2-135M-Instruct", "instruct"),
    ("google/gemma-2b-it", "instruct"), ("mistralai/Mistral-7B-v0.1", "base"), ("offline:tiny-mistral", "base"),
])
def test_base_or_instruct_comes_from_the_base_models_name(base, expected):
    assert mc.base_model_kind(base) == expected


def test_base_or_instruct_wording_follows_the_base(reports, tmp_path):
    english, japanese = mc.split_languages(render(reports))  # fixture base: offline:smollm2-135m (Instruct)
    assert "It is a base model:" not in english and "is instruction-tuned, but this run trained it" in english
    assert "指示チューニング済みのモデルですが" in japanese
    folder = tmp_path / "my-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "mistralai/Mistral-7B-v0.1"}))
    assert mc.base_model_kind(str(folder)) == "base"
    (folder / "config.json").write_text(json.dumps({}))
    assert mc.base_model_kind(str(folder)) is None


def test_the_card_states_the_base_models_real_provenance_and_credits_the_recipes_project(reports):
    english, japanese = mc.split_languages(render(reports))  # the fixture's base is offline:smollm2-135m
    assert "Q4_1" in english and "dequantised to float32" in english and "not the Hub's original weights" in english
    assert "Q4_1" in japanese and "float32 に戻した" in japanese and "ベースモデルの出所" in japanese
    for half in (english, japanese):  # the published recipe's project, next to ELYZA
        thanks = half[half.index("ELYZA"):]
        assert "Shisa" in thanks.split("\n")[1] and "https://github.com/AUGMXNT/shisa" in thanks
    path = reports / "pretrain" / "training_report.json"
    arguments = json.loads(path.read_text())["arguments"]
    arguments["model"]["model_name_or_path"] = "mistralai/Mistral-7B-v0.1"
    edit(path, arguments=arguments)
    assert "Q4_1" not in render(reports)  # a Hub base is what it says


@pytest.mark.parametrize("tied", [True, False])
def test_the_card_says_when_piece_fit_kept_the_mean_on_a_tied_head(reports, tied):
    path = reports / "pretrain" / "training_report.json"
    training = json.loads(path.read_text())
    fit = {"piece_weights": {"skipped": "tied head: ..."} if tied else {"positions": 2048}}
    edit(path, arguments={**training.get("arguments", {}), "embedding_init": "piece_fit"},
         embeddings={**(training.get("embeddings") or {}), "fit": fit})
    english, japanese = mc.split_languages(render(reports))
    line = next(line for line in english.splitlines() if line.startswith("- New embedding rows initialised with:"))
    assert "(`piece_fit`)" in line
    assert ("the pieces' weights stayed at the mean" in line) == tied
    assert ("ピースの重みは平均のまま" in japanese) == tied
