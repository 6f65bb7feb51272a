from pathlib import Path

import pytest

import demo

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_REPORTS = REPO_ROOT / "tests" / "fixtures" / "reports"


def test_every_stage_of_the_recipe_has_its_script():
    stages = demo.stages(Path("outputs/demo"), "offline:smollm2-135m")
    assert [s.name for s in stages] == ["select", "tokenizer", "mix", "pretrain", "ablation", "publish"]
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
