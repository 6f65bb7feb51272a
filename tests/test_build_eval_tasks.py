import json
import subprocess
import sys

from toolkit.corpus import read_texts

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def build(output_dir):
    subprocess.run([sys.executable, "sample_data/build_eval_tasks.py", "--output_dir", str(output_dir)],
                   cwd=REPO, check=True, capture_output=True)
    return output_dir


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bundled_files_are_what_the_builder_makes(tmp_path):
    built = build(tmp_path)
    for name in ["sft/sft_ja.jsonl", "tasks/heading_mc.jsonl", "tasks/continuation_mc.jsonl",
                 "tasks/manpage_mc.jsonl", "tasks/heading_generation.jsonl"]:
        assert (built / name).read_bytes() == (REPO / "sample_data" / name).read_bytes(), name


def test_tasks_come_from_held_out_documents_only(sample_data):
    eval_texts = " ".join(" ".join(t.split()) for t in read_texts([sample_data / "eval" / "ja_eval.jsonl.gz"])[0])
    pool_texts = " ".join(" ".join(t.split()) for t in read_texts([sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz"])[0])
    tasks = sample_data / "tasks"
    for name in ["heading_mc", "continuation_mc"]:
        for row in rows(tasks / f"{name}.jsonl"):
            passage = row["prompt"].split("\n\n", 1)[1]
            assert passage in eval_texts and passage not in pool_texts, row["id"]
            assert row["choices"][row["label"]] in eval_texts
            assert len(set(row["choices"])) == len(row["choices"]) == 4
    for row in rows(tasks / "manpage_mc.jsonl"):
        assert f"{row['choices'][row['label']]}\n" in "\n".join(read_texts([sample_data / "eval" / "ja_eval.jsonl.gz"])[0])
    generation = rows(tasks / "heading_generation.jsonl")
    assert [r["reference"] for r in generation] == [r["choices"][r["label"]] for r in rows(tasks / "heading_mc.jsonl")]


def test_sft_records_are_chats_whose_answers_no_task_asks_for(sample_data):
    records = rows(sample_data / "sft" / "sft_ja.jsonl")
    assert 300 <= len(records) <= 500
    answers = {r["messages"][-1]["content"] for r in records}
    for name in ["heading_mc", "continuation_mc", "manpage_mc"]:
        for row in rows(sample_data / "tasks" / f"{name}.jsonl"):
            assert row["choices"][row["label"]] not in answers
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    assert {r["kind"] for r in records} == {"heading", "continuation", "manpage"}
