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
