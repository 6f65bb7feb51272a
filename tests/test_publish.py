import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import publish
from fake_hub import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_REPORTS = Path(__file__).parent / "fixtures" / "reports"
TOKEN = "hf_TestTokenThatMustNeverBePrinted0123456789"


def parameters_in(folder):
    from safetensors import safe_open

    total = 0
    for shard in Path(folder).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                count = 1
                for size in handle.get_slice(name).get_shape():
                    count *= size
                total += count
    return total


@pytest.fixture
def model_dir(tmp_path, tiny_mistral_path):
    """A real (tiny, random) Mistral folder as pretrain.py leaves it: model, tokenizer, training report;
    and tmp_path/reports: the fixture reports rewritten to describe this model (same run)."""
    folder = tmp_path / "pretrain"
    folder.mkdir()
    for item in Path(tiny_mistral_path).iterdir():
        if not item.name.startswith("."):
            shutil.copyfile(item, folder / item.name)
    reports = tmp_path / "reports"
    shutil.copytree(FIXTURE_REPORTS, reports)
    training = json.loads((reports / "pretrain" / "training_report.json").read_text())
    training.update(model="offline:tiny-mistral", parameters=parameters_in(folder))
    training["arguments"]["model"]["model_name_or_path"] = "offline:tiny-mistral"
    (reports / "pretrain" / "training_report.json").write_text(json.dumps(training))
    tokenizer = json.loads((reports / "tokenizer" / "tokenizer_report.json").read_text())
    tokenizer.update(base_tokenizer="offline:mistral-7b-tokenizer", base_vocab_size=32000, final_vocab_size=32000)
    (reports / "tokenizer" / "tokenizer_report.json").write_text(json.dumps(tokenizer))
    shutil.copyfile(reports / "pretrain" / "training_report.json", folder / "training_report.json")
    return folder


@pytest.fixture
def sharded_model_dir(model_dir):
    """The same model saved in several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="6MB")
    assert (model_dir / "model.safetensors.index.json").exists()
    return model_dir


def arguments(model_dir, **overrides):
    values = {"model_dir": str(model_dir), "repo_id": "your-org/tiny-ja", "reports": str(reports_of(model_dir)),
              "dry_run": True}
    values.update(overrides)
    return publish.PublishArguments(**values)


def reports_of(model_dir):
    return Path(model_dir).parent / "reports"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- dry run
def test_dry_run_renders_the_card_and_lists_every_file_with_size_and_sha256(model_dir, capsys):
    report = publish.publish(arguments(model_dir))
    listed = {item["path"]: item for item in report["files"]}
    expected = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer.model", "tokenizer_config.json"}
    assert set(listed) == expected
    card_file = model_dir / "README.preview.md"  # a dry run leaves the model folder's README.md alone
    assert not (model_dir / "README.md").exists()
    for name in expected:
        path = card_file if name == "README.md" else model_dir / name
        assert listed[name]["size"] == path.stat().st_size
        assert listed[name]["sha256"] == sha256(path)
    assert report["left_out"] == {"training_report.json": "run record, kept local"}
    assert report["uploaded"] is False and report["card"]["sections_left_out"] == []
    assert set(report["card"]["checked_against_model"]) == {"vocabulary", "parameters", "base_model"}
    assert json.loads((model_dir / "publish_report.json").read_text())["files"] == report["files"]
    card = card_file.read_text()
    assert card.startswith("---\n") and "## English" in card and "## 日本語" in card
    printed = capsys.readouterr().out
    assert all(listed[name]["sha256"] in printed for name in expected)


def test_dry_run_report_can_go_to_output_dir(model_dir, tmp_path):
    publish.publish(arguments(model_dir, output_dir=str(tmp_path / "out")))
    assert (tmp_path / "out" / "publish_report.json").exists()
    assert not (model_dir / "publish_report.json").exists()


# ----------------------------------------------------------------------------- upload to a local Hub
def run_publish_process(hub, *extra, home):
    """scripts/publish.py in a fresh process, pointed at the local Hub by HF_ENDPOINT as a user would."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_TOKEN=TOKEN)
    return subprocess.run([sys.executable, "scripts/publish.py", *extra], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """A local Hub for in-process runs: huggingface_hub read HF_ENDPOINT at import, so patch its constants."""
    from huggingface_hub import constants

    with FakeHub(TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the Xet storage protocol is not emulated
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield hub


def run_main(monkeypatch, *argv):
    """publish.main() in this process; returns its exit code (0 when it returns normally)."""
    monkeypatch.setattr(sys, "argv", ["publish.py", *argv])
    try:
        publish.main()
    except SystemExit as exit:
        return exit.code
    return 0


@pytest.mark.slow
def test_upload_to_a_local_hub_arrives_intact_and_never_shows_the_token(sharded_model_dir, tmp_path):
    model_dir = sharded_model_dir
    with FakeHub(TOKEN) as hub:
        result = run_publish_process(hub, "--model_dir", str(model_dir), "--repo_id", "your-org/tiny-ja",
                                     "--reports", str(reports_of(model_dir)), home=tmp_path / "home")
        assert result.returncode == 0, result.stderr
        report = json.loads((model_dir / "publish_report.json").read_text())
        uploaded = {item["path"] for item in report["files"]}
        assert {"model.safetensors.index.json", "README.md", "config.json"} <= uploaded
        assert sum(name.startswith("model-") for name in uploaded) >= 2  # the shards
        remote = hub.files("your-org/tiny-ja")
        assert set(remote) == uploaded | {".gitattributes"}
        for name in uploaded:  # every byte arrived
            assert hashlib.sha256(remote[name]).hexdigest() == sha256(model_dir / name), name
        assert f"{hub.url}/your-org/tiny-ja" in result.stdout and report["uploaded"] is True
        message = hub.repos["your-org/tiny-ja"]["messages"][report["commit_oid"]]
        assert "bilingual model card" in message["summary"] and "parameters" in message["description"]
        # The token authenticated the API calls, was not sent to the storage URLs, and appears in no output.
        api_calls = [r for r in hub.requests if r[1].startswith("/api/") and r[1] != "/api/agent-harnesses"]
        assert api_calls and all(auth == f"Bearer {TOKEN}" for _, _, auth in api_calls)
        uploads = [auth for method, path, auth in hub.requests if path.startswith("/lfs-upload/")]
        assert len(uploads) >= 3 and all(auth is None for auth in uploads)
        assert hub.unhandled == []
    assert TOKEN not in result.stdout + result.stderr
    for written in (model_dir / "publish_report.json", model_dir / "README.md"):
        assert TOKEN not in written.read_text()


def test_existing_repo_needs_create_pr_or_overwrite(model_dir, local_hub, monkeypatch, capfd):
    common = ["--model_dir", str(model_dir), "--repo_id", "org/tiny-ja", "--reports", str(reports_of(model_dir))]
    assert run_main(monkeypatch, *common) == 0
    main_before = local_hub.repos["org/tiny-ja"]["refs"]["main"]
    # A second upload to the now non-empty repo is refused ...
    assert run_main(monkeypatch, *common) == 1
    assert "already has" in capfd.readouterr().err
    # ... but can be proposed as a pull request (here with a retitled card), leaving main as it was ...
    assert run_main(monkeypatch, *common, "--create_pr", "--model_name", "Tiny JA v2") == 1  # a new card text ...
    assert "README.md exists and differs" in capfd.readouterr().err  # ... replaces README.md only when asked
    assert run_main(monkeypatch, *common, "--create_pr", "--model_name", "Tiny JA v2", "--overwrite_card") == 0
    assert "/discussions/1" in capfd.readouterr().out
    assert local_hub.repos["org/tiny-ja"]["refs"]["main"] == main_before
    assert "# Tiny JA v2" in local_hub.files("org/tiny-ja", "refs/pr/1")["README.md"].decode()
    # ... or overwrite it, which also deletes remote files this upload no longer has.
    (model_dir / "tokenizer.model").unlink()
    assert run_main(monkeypatch, *common, "--overwrite", "--overwrite_card") == 0
    assert "tokenizer.model" not in local_hub.files("org/tiny-ja") and "README.md" in local_hub.files("org/tiny-ja")
    assert local_hub.unhandled == []
    assert TOKEN not in "".join(capfd.readouterr())


def test_upload_to_a_new_branch_of_a_private_repo(model_dir, local_hub, monkeypatch):
    assert run_main(monkeypatch, "--model_dir", str(model_dir), "--repo_id", "org/private-ja", "--private",
                    "--revision", "experiment", "--reports", str(reports_of(model_dir))) == 0
    assert local_hub.repos["org/private-ja"]["private"] is True
    assert "model.safetensors" in local_hub.files("org/private-ja", "experiment")
    assert "model.safetensors" not in local_hub.files("org/private-ja", "main")


def test_upload_without_a_token_says_how_to_log_in(model_dir, local_hub, monkeypatch, capfd):
    monkeypatch.delenv("HF_TOKEN")
    assert run_main(monkeypatch, "--model_dir", str(model_dir), "--repo_id", "org/x") == 1
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capfd.readouterr().err
    assert local_hub.repos == {}


def test_a_rejected_token_fails_without_being_printed(model_dir, local_hub, monkeypatch, capfd):
    local_hub.token = "hf_the_right_one"
    assert run_main(monkeypatch, "--model_dir", str(model_dir), "--repo_id", "org/x") == 1
    out, err = capfd.readouterr()
    assert "401" in err and TOKEN not in out + err


# ----------------------------------------------------------------------------- bad inputs
def test_offline_mode_refuses_a_real_upload(model_dir):
    with pytest.raises(publish.PublishError, match="HF_HUB_OFFLINE is set"):
        publish.publish(arguments(model_dir, dry_run=False))


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "org/bad name!", "org/--double--dash", ""])
def test_invalid_repo_id(model_dir, repo_id):
    with pytest.raises(publish.PublishError, match=r"--repo_id .*(not a valid Hub repo id|give it as ORG/NAME)"):
        publish.publish(arguments(model_dir, repo_id=repo_id))
    assert not (model_dir / "README.md").exists()  # refused before anything was written


def test_missing_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(publish.PublishError, match="no safetensors weights"):
        publish.publish(arguments(model_dir))


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(publish.PublishError, match="no config.json"):
        publish.publish(arguments(model_dir))


def test_config_vocab_size_that_the_embeddings_do_not_have(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] = 32064
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(publish.PublishError, match=r"embed_tokens.weight has shape \[32000, 64\].*vocab_size=32064"):
        publish.publish(arguments(model_dir))


def test_tokenizer_larger_than_the_vocabulary(model_dir, smollm2_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(smollm2_path) / name, model_dir / name)
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(publish.PublishError, match="vocabulary mismatch: the tokenizer has 49,152 tokens .* 32,000"):
        publish.publish(arguments(model_dir))


def test_vocabulary_much_larger_than_the_tokenizer(model_dir):
    with pytest.raises(publish.PublishError, match="vocabulary mismatch: .*unused rows"):
        publish.publish(_shrunk_tokenizer(model_dir))


def _shrunk_tokenizer(model_dir):
    """The model's tokenizer minus 1,000 tokens (so 1,000 embedding rows would never be used)."""
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    keep = {piece: index for piece, index in vocab.items() if index < len(vocab) - 1000}
    tokenizer["model"]["vocab"] = keep
    pairs = [m if isinstance(m, list) else m.split(" ") for m in tokenizer["model"]["merges"]]
    tokenizer["model"]["merges"] = [pair for pair in pairs if all(part in keep for part in [*pair, "".join(pair)])]
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    (model_dir / "tokenizer.model").unlink()
    return arguments(model_dir)


def test_stray_files_are_refused_and_can_be_left_out_explicitly(model_dir):
    (model_dir / "optimizer.pt").write_bytes(b"x")
    (model_dir / "checkpoints" / "step_10").mkdir(parents=True)
    (model_dir / "checkpoints" / "step_10" / "model.safetensors").write_bytes(b"x")
    (model_dir / "notes.txt").write_text("x")
    (model_dir / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(publish.PublishError) as error:
        publish.publish(arguments(model_dir))
    message = str(error.value)
    for expected in ("optimizer.pt (optimizer state)", "checkpoints/step_10/model.safetensors (training checkpoint)",
                     "notes.txt (not a model file)", "pytorch_model.bin (pickle weights", "--ignore_patterns"):
        assert expected in message
    report = publish.publish(arguments(model_dir, ignore_patterns=["optimizer.pt", "checkpoints/*", "notes.txt", "*.bin"]))
    assert not {"optimizer.pt", "notes.txt", "pytorch_model.bin"} & {item["path"] for item in report["files"]}
    assert report["left_out"]["checkpoints/step_10/model.safetensors"] == "--ignore_patterns"


def test_shard_missing_from_the_index(sharded_model_dir):
    shard = sorted(sharded_model_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(publish.PublishError, match=f"index.json: names shard.*{shard.name}.*not in the folder"):
        publish.publish(arguments(sharded_model_dir))


def test_generation_config_with_another_eos(model_dir):
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = 5
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(publish.PublishError, match="eos_token_id=5 but the tokenizer's EOS '</s>' is id 2"):
        publish.publish(arguments(model_dir))
    (model_dir / "generation_config.json").unlink()
    with pytest.raises(publish.PublishError, match="no generation_config.json"):
        publish.publish(arguments(model_dir))


def test_create_pr_with_a_revision_is_refused(model_dir):
    with pytest.raises(publish.PublishError, match="--create_pr"):
        publish.publish(arguments(model_dir, create_pr=True, revision="dev"))


# ----------------------------------------------------------------------------- never clobber, report everything
HAND_WRITTEN = "---\nlicense: mit\n---\n# My own card\n\nWritten by hand; keep me.\n"


def test_dry_run_leaves_a_hand_written_readme_byte_identical(model_dir):
    (model_dir / "README.md").write_text(HAND_WRITTEN)
    before = (model_dir / "README.md").read_bytes()
    with pytest.raises(publish.PublishError, match="README.md exists and differs .*--overwrite_card"):
        publish.publish(arguments(model_dir))
    assert (model_dir / "README.md").read_bytes() == before
    report = publish.publish(arguments(model_dir, overwrite_card=True))  # allowed, and still a dry run
    assert (model_dir / "README.md").read_bytes() == before
    rendered = Path(report["card"]["path"])
    assert rendered.name == "README.preview.md" and "## 日本語" in rendered.read_text()
    listed = {item["path"]: item for item in report["files"]}
    assert listed["README.md"]["sha256"] == sha256(rendered)  # what a real run would upload


def test_a_real_run_never_replaces_a_hand_written_readme_without_overwrite_card(model_dir, local_hub, monkeypatch,
                                                                               capfd):
    (model_dir / "README.md").write_text(HAND_WRITTEN)
    common = ["--model_dir", str(model_dir), "--repo_id", "org/tiny-ja", "--reports", str(reports_of(model_dir))]
    assert run_main(monkeypatch, *common) == 1
    assert "README.md exists and differs" in capfd.readouterr().err
    assert (model_dir / "README.md").read_text() == HAND_WRITTEN and local_hub.repos == {}
    assert run_main(monkeypatch, *common, "--overwrite_card") == 0
    assert "## 日本語" in (model_dir / "README.md").read_text()
    assert local_hub.files("org/tiny-ja")["README.md"] == (model_dir / "README.md").read_bytes()


def test_a_folder_with_three_problems_gets_all_three_reported(model_dir):
    (model_dir / "README.md").write_text(HAND_WRITTEN)
    (model_dir / "optimizer.pt").write_bytes(b"x")
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = 5
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(publish.PublishError) as error:
        publish.publish(arguments(model_dir))
    message = str(error.value)
    assert "3 problem(s), nothing was published" in message
    for expected in ("1. refusing to publish 1 file(s)", "optimizer.pt (optimizer state)",
                     "eos_token_id=5 but the tokenizer's EOS '</s>' is id 2", "README.md exists and differs"):
        assert expected in message
    recorded = json.loads((model_dir / "publish_report.json").read_text())
    assert len(recorded["problems"]) == 3 and recorded["uploaded"] is False
    assert (model_dir / "README.md").read_text() == HAND_WRITTEN


def test_a_card_from_another_runs_reports_is_refused(model_dir):
    """The fixture reports describe SmolLM2-135M extended to 53,248 tokens; the folder is a 4M-parameter
    2-layer Mistral with 32,000 tokens. Vocabulary, parameters and base model are all reported."""
    with pytest.raises(publish.PublishError) as error:
        publish.publish(arguments(model_dir, reports=str(FIXTURE_REPORTS)))
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "53,248 tokens (tokenizer_report.json) but the model folder's tokenizer has 32,000" in message
    assert f"137,000,000 parameters (training_report.json) but the weights hold {parameters_in(model_dir):,}" in message
    assert "names HuggingFaceTB/SmolLM2-135M-Instruct as the base model" in message  # what the card would state
    assert "model_type llama vs mistral" in message


def test_a_base_model_named_on_the_command_line_is_checked_too(model_dir):
    with pytest.raises(publish.PublishError, match=r"(?s)1 problem\(s\).*names offline:smollm2-135m as the base model "
                                                   r"\(the card's base_model\)"):
        publish.publish(arguments(model_dir, base_model="offline:smollm2-135m"))


def test_a_tied_output_matrix_that_the_file_also_stores_counts_once(model_dir):
    """DeepSpeed's 16-bit save writes lm_head.weight even when it is tied to the embeddings (the
    demo's SmolLM2); the model has the parameters once, as training_report.json counts them."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    reports = reports_of(model_dir)
    training = json.loads((reports / "pretrain" / "training_report.json").read_text())
    training.update(model=str(model_dir), parameters=model.num_parameters())
    training["arguments"]["model"]["model_name_or_path"] = str(model_dir)
    (reports / "pretrain" / "training_report.json").write_text(json.dumps(training))
    shutil.copyfile(reports / "pretrain" / "training_report.json", model_dir / "training_report.json")
    report = publish.publish(arguments(model_dir))
    assert report["weights"]["parameters"] == model.num_parameters()
    assert report["weights"]["stored_parameters"] == model.num_parameters() + 32000 * 64
