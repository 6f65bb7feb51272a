"""Shared fixtures: the offline base assets and the bundled sample corpus."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from toolkit import assets  # noqa: E402  (pytest.ini puts scripts/ on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data"


@pytest.fixture(scope="session")
def sample_data():
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def mistral_tokenizer_path():
    return assets.resolve("offline:mistral-7b-tokenizer")


@pytest.fixture(scope="session")
def tiny_mistral_path():
    return assets.resolve("offline:tiny-mistral")


@pytest.fixture(scope="session")
def smollm2_path():
    return assets.resolve("offline:smollm2-135m")


@pytest.fixture
def lm_eval_task_yaml():
    """Writes a minimal lm-eval generation task `name` over `records` (a local JSONL) into `folder`."""
    import json

    def write(folder, name, records):
        data = folder / f"{name}.data.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
            "generation_kwargs:\n  until: ['\\n']\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
            "    higher_is_better: true\n", encoding="utf-8")
        return name

    return write
