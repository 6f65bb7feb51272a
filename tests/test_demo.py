import json
from pathlib import Path

import pytest

import demo

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_REPORTS = REPO_ROOT / "tests" / "fixtures" / "reports"


def test_every_stage_of_the_recipe_has_its_script():
    stages = demo.stages(Path("outputs/demo"), "offline:smollm2-135m")
    assert [s.name for s in stages] == ["select", "tokenizer", "mix", "pretrain", "pretrain_base", "ablation", "publish"]
    for stage in stages:
        assert (REPO_ROOT / "scripts" / stage.script).is_file(), stage.script
        assert f"scripts/{stage.script}" in stage.command
        assert all(isinstance(part, str) for part in stage.command), stage.name  # shlex.join needs str


def test_key_figures_come_from_the_reports(tmp_path):
    rows = dict(demo.key_figures(FIXTURE_REPORTS.relative_to(demo.REPO_ROOT)))
    assert "selected documents" in rows and "vocabulary" in rows and "continued pretraining" in rows
    assert demo.key_figures(Path(tmp_path)) == []  # no reports, no invented figures


def test_stage_names_are_checked():
    all_stages = demo.stages(Path("outputs/demo"), "offline:smollm2-135m")
    assert [s.name for s in demo.chosen_stages(all_stages, "mix, select")] == ["select", "mix"]
    assert demo.chosen_stages(all_stages, "all") == all_stages
    with pytest.raises(SystemExit, match=r"unknown stage\(s\) pretrian; choose from: select, .*pretrain"):
        demo.chosen_stages(all_stages, "select,pretrian")


def test_the_demo_runs_three_arms_on_the_same_characters():
    stages = {s.name: s.command for s in demo.stages(Path("outputs/demo"), "offline:smollm2-135m")}

    def value(command, flag):
        return command[command.index(flag) + 1]

    extended, base = stages["pretrain"], stages["pretrain_base"]
    # the same mix (each arm's own tokenisation of it), the same characters, the same sizes
    assert value(extended, "--train_token_dir") == "outputs/demo/mix/tokens"
    assert value(base, "--train_token_dir") == "outputs/demo/mix/tokens-base"
    assert value(base, "--tokenizer_name") == value(base, "--model_name_or_path") == "offline:smollm2-135m"
    assert "base=offline:smollm2-135m" in stages["mix"]
    # both languages of the mix are decontaminated against the same task items as the selection
    assert value(stages["mix"], "--decontaminate_against") == value(stages["select"], "--decontaminate_against")
    differing = {flag for flag in ("--max_train_characters", "--block_size", "--per_device_train_batch_size",
                                   "--learning_rate", "--max_train_steps") if flag in extended or flag in base
                 if flag not in extended or flag not in base or value(extended, flag) != value(base, flag)}
    assert differing == set() and "--max_train_steps" not in extended
    ablation = stages["ablation"]
    models = ablation[ablation.index("--models") + 1: ablation.index("--models") + 4]
    assert models == ["offline:smollm2-135m", "outputs/demo/pretrain-base", "outputs/demo/pretrain"]
    assert "data=continued:base" in ablation and "tokenizer=extended:continued" in ablation
    assert "--max_new_tokens" not in ablation and value(ablation, "--max_new_characters") == "40"


def test_key_figures_show_the_speed_ratio_with_both_factors_and_what_each_arm_wrote(tmp_path):
    effect = {"difference": 0.0, "ci95": [-0.1, 0.1], "p_value": 0.5, "p_holm": None, "survives_holm": None,
              "verdict": "too few items to tell"}
    speeds = {name: {"characters_per_second": cps, "tokens_per_second": tps, "characters_per_token": cps / tps}
              for name, cps, tps in (("continued", 20.0, 20.0), ("extended", 36.0, 18.0))}
    report = {"models": [{"name": "continued"}, {"name": "extended"}], "baseline": "continued",
              "effects": [{"name": "tokenizer", "minuend": "extended", "subtrahend": "continued"}],
              "metrics": [{"task": "heading_mc", "metric": "accuracy", "primary": True, "examples": 6,
                           "values": {"continued": 0.5, "extended": 0.5}, "effects": {"tokenizer": effect}}],
              "decoding_speed": speeds,
              "speed_ratios": {"tokenizer": {"characters_per_second": 1.8, "tokens_per_second": 0.9,
                                             "characters_per_token": 2.0}},
              "free_generation": {"continued": {"characters_per_token": 0.66}, "extended": {"characters_per_token": 1.0}}}
    (tmp_path / "ablation").mkdir()
    (tmp_path / "ablation" / "ablation_results.json").write_text(json.dumps(report))
    rows = dict(demo.key_figures(tmp_path))
    assert rows["speed ratio (tokenizer)"] == ("1.80x reference characters/s; tokens/s ratio x characters/token ratio "
                                               "= 0.90 x 2.00 = 1.80 (0.0% apart)")
    assert rows["characters/token extended"] == ("2.00 on the reference text (the tokenizer's capacity), 1.00 in what "
                                                 "it wrote (free generation)")
    assert "too few items to tell" in rows["heading_mc (accuracy)"]


def test_key_figures_show_the_first_fine_tuning_loss_per_token_and_per_character(tmp_path):
    """Per token the extended arm's loss is ~2x at equal quality (its tokens hold ~2x the characters);
    per character the arms compare, so the summary shows both, averaged over seeds."""
    def run(seed, per_token, per_character):
        return {"seed": seed, "finetune_report": {"first_loss": per_token, "first_loss_per_character": per_character}}
    report = {"models": [{"name": "continued", "runs": [run(0, 3.6, 4.0), run(1, 3.8, 4.2)]},
                         {"name": "extended", "runs": [run(0, 8.8, 5.0)]},
                         {"name": "base", "runs": [run(0, 3.9, None)]}],
              "baseline": "continued",
              "metrics": [{"task": "heading_mc", "metric": "accuracy", "examples": 6,
                           "values": {"continued": 0.5, "extended": 0.5, "base": 0.5}}]}
    (tmp_path / "ablation").mkdir()
    (tmp_path / "ablation" / "ablation_results.json").write_text(json.dumps(report))
    rows = dict(demo.key_figures(tmp_path))
    assert rows["first fine-tuning loss continued"] == ("3.70 nats/answer token, 4.10 nats/answer character "
                                                       "(comparable across tokenizers)")
    assert rows["first fine-tuning loss extended"].startswith("8.80 nats/answer token, 5.00 nats/answer character")
    assert rows["first fine-tuning loss base"] == "3.90 nats/answer token"
