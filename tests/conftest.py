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
