#!/usr/bin/env python
"""What the pre-upload checks of publish.py cost, against what an upload costs locally anyway.

    python benchmarks/bench_publish.py --model_dir PATH_OR_OFFLINE_NAME [--repeats 3]

Times, in one process, on the same folder: (a) each phase of `publish.py --dry_run` (card
rendered into a temporary folder, file classification, weight/config check on the meta
device, tokenizer + generation check, the card's figures against the model, sha256 of every
file) and (b) the baseline: huggingface_hub building the `CommitOperationAdd`
of every file and computing its upload info (the sha256 `upload_folder` needs before it sends
anything). Prints a markdown table with the ratio of each phase to the baseline. Best of
`--repeats` runs (the file cache is warm after the first).
"""

import sys
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, HfArgumentParser

# The shared toolkit lives in scripts/toolkit; this file runs standalone from the repo or anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from toolkit import assets, model_card, publishing
from toolkit.reports import sha256_of, write_json_atomic
from toolkit.quiet import quiet_by_default


@dataclass
class BenchArguments:
    model_dir: str = field(default="offline:smollm2-135m", metadata={"help": "Model folder or offline: name."})
    repeats: int = field(default=3, metadata={"help": "Runs per phase; the best is kept."})


def best_of(repeats, function):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def render_card(folder, card_config):
    with tempfile.TemporaryDirectory() as scratch:
        return model_card.build_card("bench/model", [folder], card_config, scratch)


def main():
    quiet_by_default()  # known third-party deprecation warnings hidden unless --verbose
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    source = Path(assets.resolve(args.model_dir))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        folder.mkdir()
        for item in source.iterdir():  # links, not copies: the same bytes on disk
            if not item.name.startswith("."):
                (folder / item.name).symlink_to(item.resolve())
        card_config = model_card.load_card_config()
        config = AutoConfig.from_pretrained(folder)
        files, _ = publishing.classify_files(folder, [], [])
        # Reports of this very model, as pretrain.py and extend_tokenizer.py leave them, so the
        # card has figures to check against the folder (vocabulary, parameters, base model).
        weights = publishing.check_weights(folder, files, config, [])
        tokenizer = publishing.check_tokenizer_and_generation(folder, config, 128, [])
        write_json_atomic(folder / "training_report.json", {
            "model": args.model_dir, "parameters": weights["parameters"], "steps": 1, "tokens_seen": 1})
        write_json_atomic(folder / "tokenizer_report.json", {
            "base_vocab_size": tokenizer["tokenizer_length"], "final_vocab_size": tokenizer["tokenizer_length"]})
        facts = render_card(folder, card_config)["facts"]
        compared = publishing.check_card_against_model(facts, config, weights, tokenizer, [])
        assert set(compared) == {"vocabulary", "parameters", "base_model"} and compared["base_model"]["checked"]
        total = sum((folder / name).stat().st_size for name in files)

        def hash_all():
            class Null:
                def update(self, _):
                    pass

            for name in files:
                sha256_of(folder / name, Null())

        def baseline():
            from huggingface_hub import CommitOperationAdd

            for name in files:
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)).upload_info.sha256

        phases = {
            "render + validate card (temporary folder)": lambda: render_card(folder, card_config),
            "classify files": lambda: publishing.classify_files(folder, [], []),
            "weights vs config (meta device)": lambda: publishing.check_weights(folder, files, config, []),
            "tokenizer + generation config": lambda: publishing.check_tokenizer_and_generation(folder, config, 128, []),
            "card vs model (vocabulary, parameters, base)":
                lambda: publishing.check_card_against_model(facts, config, weights, tokenizer, []),
            "sha256 of every file": hash_all,
        }
        baseline_seconds = best_of(args.repeats, baseline)
        print(f"model: {args.model_dir} ({len(files)} files, {total / 1e6:.1f} MB); best of {args.repeats}\n")
        print("| phase | seconds | / baseline |\n|---|---:|---:|")
        checks = 0.0
        for name, function in phases.items():
            seconds = best_of(args.repeats, function)
            checks += seconds if name != "sha256 of every file" else 0.0
            print(f"| {name} | {seconds:.3f} | {seconds / baseline_seconds:.2f} |")
        print(f"| all checks (no hashing) | {checks:.3f} | {checks / baseline_seconds:.2f} |")
        print(f"| baseline: huggingface_hub upload info (sha256) of every file | {baseline_seconds:.3f} | 1.00 |")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
