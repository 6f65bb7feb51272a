"""Embedding extension: resize to a multiple of 64 and initialise new rows from the base
model's own rows for each new token's base decomposition (toolkit/embeddings.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from extended_tokenizers import WORDS, extend_with_added_tokens, extend_with_merges
from toolkit.embeddings import (DATA_INITS, FitSettings, NewRowsLearningRate, check_extension, decompose_new_tokens,
                                extend_embeddings, mine_contexts)


@pytest.fixture(scope="module")
def mistral_merged(tiny_mistral_path, tmp_path_factory):
    return extend_with_merges(tiny_mistral_path, WORDS, tmp_path_factory.mktemp("mistral_merged"))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_extended_tokenizer_fixture_is_an_extension(tiny_mistral_path, mistral_merged):
    base, extended = AutoTokenizer.from_pretrained(tiny_mistral_path), AutoTokenizer.from_pretrained(mistral_merged)
    check_extension(base, extended)
    text = "日本語の設定"
    assert len(extended(text)["input_ids"]) < len(base(text)["input_ids"])
    assert extended.decode(extended(text, add_special_tokens=False)["input_ids"]) == text


def test_subword_mean_untied_mistral(tiny_mistral_path, mistral_merged):
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path)
    tokenizer = AutoTokenizer.from_pretrained(mistral_merged)
    model = load(tiny_mistral_path)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    report = extend_embeddings(model, tokenizer, base_tokenizer, init="subword_mean")
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tokenizer) and rows - len(tokenizer) < 64
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert model.config.vocab_size == rows == report["embedding_rows_after"]
    assert report["new_tokens"] == len(tokenizer) - len(base_tokenizer) > 0
    new_input = model.get_input_embeddings().weight.detach()
    new_output = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(new_input[:32000], old_input)
    torch.testing.assert_close(new_output[:32000], old_output)
    word_id = tokenizer.convert_tokens_to_ids("▁日本語")
    pieces = base_tokenizer("日本語", add_special_tokens=False)["input_ids"]  # ▁ 日 本 語
    assert base_tokenizer.convert_ids_to_tokens(pieces) == ["▁", "日", "本", "語"]
    torch.testing.assert_close(new_input[word_id], old_input[pieces].mean(0))
    torch.testing.assert_close(new_output[word_id], old_output[pieces].mean(0))
    # input and output rows are initialised from their own matrices
    assert not torch.allclose(new_input[word_id], new_output[word_id])


def test_added_tokens_drop_the_lone_word_start_piece(tiny_mistral_path, tmp_path):
    folder = extend_with_added_tokens(tiny_mistral_path, ["東京都"], tmp_path / "added")
    base_tokenizer, tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path), AutoTokenizer.from_pretrained(folder)
    (index, pieces), = decompose_new_tokens(base_tokenizer, tokenizer).items()
    assert index == 32000
    assert base_tokenizer.convert_ids_to_tokens(pieces) == ["東", "京", "都"]
    model = load(tiny_mistral_path)
    old = model.get_input_embeddings().weight.detach().clone()
    extend_embeddings(model, tokenizer, base_tokenizer)
    torch.testing.assert_close(model.get_input_embeddings().weight[32000].detach(), old[pieces].mean(0))


def test_tied_smollm2(smollm2_path, tmp_path):
    folder = extend_with_merges(smollm2_path, WORDS, tmp_path / "smol")
    base_tokenizer, tokenizer = AutoTokenizer.from_pretrained(smollm2_path), AutoTokenizer.from_pretrained(folder)
    model = load(smollm2_path)
    assert model.config.tie_word_embeddings
    old = model.get_input_embeddings().weight.detach().clone()
    report = extend_embeddings(model, tokenizer, base_tokenizer)
    assert report["tied_embeddings"]
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()
    word_id = tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(tokenizer("データ", add_special_tokens=False)["input_ids"])[0])
    assert word_id >= len(base_tokenizer)
    pieces = base_tokenizer("データ", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(weight[word_id].detach(), old[pieces].mean(0))
    # the model still runs, and the output over the new vocabulary has the new size
    logits = model(input_ids=torch.tensor([[1, word_id]])).logits
    assert logits.shape[-1] == weight.shape[0] == 49216


def test_inits_differ(tiny_mistral_path, mistral_merged):
    base_tokenizer, tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path), AutoTokenizer.from_pretrained(mistral_merged)
    word_id = tokenizer.convert_tokens_to_ids("▁日本語")
    rows = {}
    for init in ("subword_mean", "hf_mean", "random"):
        model = load(tiny_mistral_path)
        extend_embeddings(model, tokenizer, base_tokenizer, init=init)
        rows[init] = model.get_input_embeddings().weight[:, :].detach()
    mean = rows["hf_mean"][:32000].mean(0)
    torch.testing.assert_close(rows["hf_mean"][word_id], mean, atol=1e-3, rtol=0)
    assert not torch.allclose(rows["subword_mean"][word_id], mean, atol=1e-3)
    assert not torch.allclose(rows["random"][word_id], mean, atol=1e-3)
    with pytest.raises(ValueError, match="embedding_init"):
        extend_embeddings(load(tiny_mistral_path), tokenizer, base_tokenizer, init="zeros")


def test_not_an_extension_is_refused(tiny_mistral_path, smollm2_path):
    model = load(tiny_mistral_path)
    with pytest.raises(ValueError, match="not an extension"):
        extend_embeddings(model, AutoTokenizer.from_pretrained(smollm2_path), AutoTokenizer.from_pretrained(tiny_mistral_path))


# --------------------------------------------------------------------------- data-aware inits


@pytest.fixture(scope="module")
def merged_shards(sample_data, mistral_merged, tmp_path_factory):
    """Token shards of 12 JA documents for the merged tokenizer: contexts of the data-aware inits."""
    import gzip

    from toolkit.token_shards import tokenize_locally

    with gzip.open(sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz", "rt") as stream:
        lines = [next(stream) for _ in range(12)]
    folder = tmp_path_factory.mktemp("merged_shards")
    (folder / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    tokenize_locally([folder / "train.jsonl"], str(mistral_merged), folder / "tokens")
    return folder / "tokens"


def fitted(path, tokenizer_path, contexts, init="distill", steps=4):
    base_tokenizer, tokenizer = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(tokenizer_path)
    model = load(path)
    torch.manual_seed(0)  # the padding rows' draws (pretrain.py seeds with --seed)
    report = extend_embeddings(model, tokenizer, base_tokenizer, init=init, contexts=contexts,
                               fit=FitSettings(steps=steps, target_layer=1, learning_rate=0.01, regularisation=0))
    return model, report


@pytest.mark.parametrize("init", DATA_INITS)
def test_data_aware_init_lowers_its_objective_and_keeps_base_rows(init, tiny_mistral_path, mistral_merged,
                                                                  merged_shards):
    contexts = mine_contexts(merged_shards, window=32, max_tokens=512, seed=0)
    assert contexts.shape == (16, 32)
    reference, _ = fitted(tiny_mistral_path, mistral_merged, contexts, init="subword_mean")
    model, report = fitted(tiny_mistral_path, mistral_merged, contexts, init=init)
    fit = report["fit"]
    assert fit["contexts"] == 16 and fit["context_tokens"] == 512 and fit["processes"] == 1
    assert fit["new_tokens_with_contexts"] > 0
    assert fit["new_tokens_with_contexts"] + fit["new_tokens_without_contexts"] == report["new_tokens"]
    before, after = fit["objective_before"], fit["objective_after"]
    assert after["next_token_cross_entropy"] < before["next_token_cross_entropy"]
    if init == "distill":
        assert 0 < after["hidden_state_mse"] < before["hidden_state_mse"]
    else:
        assert after["hidden_state_mse"] == before["hidden_state_mse"] == 0
    for matrix in ("get_input_embeddings", "get_output_embeddings"):
        old, new = getattr(reference, matrix)().weight.detach(), getattr(model, matrix)().weight.detach()
        assert torch.equal(new[:32000], old[:32000]), matrix  # the base vocabulary: bit-identical
    new_rows = slice(32000, 32000 + report["new_tokens"])  # (padding rows are random draws)
    changed = {matrix: int((getattr(model, matrix)().weight[new_rows] != getattr(reference, matrix)().weight[new_rows])
                           .any(1).sum()) for matrix in ("get_input_embeddings", "get_output_embeddings")}
    assert changed["get_output_embeddings"] == report["new_tokens"]  # every new output row is in the fit
    # input rows: distilled for the tokens seen in the contexts, subword_mean for offset_fit
    assert changed["get_input_embeddings"] == (fit["new_tokens_with_contexts"] if init == "distill" else 0)
    # a token without contexts keeps its subword_mean input row
    seen = set(contexts.flatten().tolist())
    unseen = [i for i in range(32000, 32000 + report["new_tokens"]) if i not in seen]
    assert len(unseen) == fit["new_tokens_without_contexts"]
    for index in unseen:
        assert torch.equal(model.get_input_embeddings().weight[index], reference.get_input_embeddings().weight[index])


@pytest.mark.parametrize("init", DATA_INITS)
def test_data_aware_init_is_deterministic(init, tiny_mistral_path, mistral_merged, merged_shards):
    first = mine_contexts(merged_shards, window=32, max_tokens=256, seed=3)
    assert torch.equal(first, mine_contexts(merged_shards, window=32, max_tokens=256, seed=3))
    assert not torch.equal(first, mine_contexts(merged_shards, window=32, max_tokens=256, seed=4))
    one, report_one = fitted(tiny_mistral_path, mistral_merged, first, init=init, steps=2)
    two, report_two = fitted(tiny_mistral_path, mistral_merged, first, init=init, steps=2)
    for matrix in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(one, matrix)().weight, getattr(two, matrix)().weight)
    assert report_one["fit"]["objective_after"] == report_two["fit"]["objective_after"]


@pytest.mark.parametrize("init", DATA_INITS)
def test_tied_head_gets_one_fitted_row(init, smollm2_path, tmp_path, sample_data):
    import gzip

    from toolkit.token_shards import tokenize_locally

    folder = extend_with_merges(smollm2_path, WORDS, tmp_path / "smol")
    with gzip.open(sample_data / "pool/data/ja/ja_clean_0000.jsonl.gz", "rt") as stream:
        (tmp_path / "train.jsonl").write_text("".join(next(stream) for _ in range(6)), encoding="utf-8")
    tokenize_locally([tmp_path / "train.jsonl"], str(folder), tmp_path / "tokens")
    contexts = mine_contexts(tmp_path / "tokens", window=32, max_tokens=128, seed=0)
    model, report = fitted(smollm2_path, folder, contexts, init=init, steps=2)
    assert report["tied_embeddings"] and "one tied row" in report["fit"]["method"]
    if init == "piece_fit":  # a tied row is also the input row: the piece weights stay subword_mean's
        assert report["fit"]["piece_weights"]["skipped"].startswith("tied head")
        assert "subword_mean output row" in report["fit"]["method"]
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    fit = report["fit"]
    assert fit["objective_after"]["next_token_cross_entropy"] < fit["objective_before"]["next_token_cross_entropy"]


@pytest.mark.parametrize("init", DATA_INITS)
def test_bad_input_falls_back_to_subword_mean_counted(init, tiny_mistral_path, mistral_merged, merged_shards,
                                                      monkeypatch):
    """A token the base cannot split: its contexts cannot be written in base pieces, so they are
    dropped and counted; no usable context at all: every row stays subword_mean, reported."""
    import toolkit.embeddings as embeddings

    contexts = mine_contexts(merged_shards, window=32, max_tokens=512, seed=0)
    present = sorted({i for i in contexts.flatten().tolist() if i >= 32000})
    real = embeddings.decompose_new_tokens

    def without_pieces(base_tokenizer, tokenizer):
        decompositions = real(base_tokenizer, tokenizer)
        decompositions[present[0]] = []  # as for a token the base tokenizer cannot encode
        return decompositions

    monkeypatch.setattr(embeddings, "decompose_new_tokens", without_pieces)
    model, report = fitted(tiny_mistral_path, mistral_merged, contexts, init=init)
    with_token = sum(1 for context in contexts if present[0] in context.tolist())
    assert report["new_tokens_without_decomposition"] == 1
    assert report["fit"]["contexts_with_a_token_without_pieces"] == with_token > 0
    assert report["fit"]["contexts"] == 16 - with_token

    everywhere = torch.full_like(contexts, present[0])  # no context can be written in base pieces
    reference, _ = fitted(tiny_mistral_path, mistral_merged, contexts, init="subword_mean")
    model, report = fitted(tiny_mistral_path, mistral_merged, everywhere, init=init)
    assert report["fit"]["fallback"] == "subword_mean" and report["fit"]["contexts"] == 0
    assert report["fit"]["new_tokens_without_contexts"] == report["new_tokens"]
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    assert torch.equal(model.get_output_embeddings().weight, reference.get_output_embeddings().weight)


def test_piece_fit_starts_at_subword_mean_and_lowers_its_first_stage(tiny_mistral_path, mistral_merged, merged_shards):
    """Before its first stage, piece_fit's row (first, middle mean and last piece at 1/k, (k-2)/k, 1/k)
    is the subword_mean row; the stage then lowers its own cross-entropy."""
    from toolkit.embeddings import PIECE_BUCKETS, _piece_rows, _subword_mean_piece_weights

    base_tokenizer = AutoTokenizer.from_pretrained(tiny_mistral_path)
    reference, _ = fitted(tiny_mistral_path, mistral_merged, None, init="subword_mean")
    decompositions = decompose_new_tokens(base_tokenizer, AutoTokenizer.from_pretrained(mistral_merged))
    assert {len(parts) for parts in decompositions.values()} >= {2, 3, 4}  # no middle, one middle piece, several
    new_ids = torch.tensor(sorted(decompositions))
    output = reference.get_output_embeddings().weight.detach()
    slots, bucket = _piece_rows(decompositions, new_ids, output[:32000], output[new_ids])
    rows = (_subword_mean_piece_weights("cpu")[bucket][:, :, None] * slots).sum(1)
    short = torch.tensor([len(decompositions[int(i)]) < PIECE_BUCKETS for i in new_ids])
    torch.testing.assert_close(rows[short], output[new_ids][short])

    _, report = fitted(tiny_mistral_path, mistral_merged, mine_contexts(merged_shards, window=32, max_tokens=512),
                       init="piece_fit")
    first_stage = report["fit"]["piece_weights"]
    assert first_stage["positions"] == 16 * 31  # fewer positions than piece_weight_positions: all of them
    assert first_stage["next_token_cross_entropy_after"] < first_stage["next_token_cross_entropy_before"]
    assert "first, middle and last piece" in report["fit"]["method"]


def test_data_aware_init_needs_contexts(tiny_mistral_path, mistral_merged):
    with pytest.raises(ValueError, match="needs contexts"):
        extend_embeddings(load(tiny_mistral_path), AutoTokenizer.from_pretrained(mistral_merged),
                          AutoTokenizer.from_pretrained(tiny_mistral_path), init="distill")


# --------------------------------------------------------------------------- a learning rate for the new rows


def tiny_llama(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))


def one_adamw_step(model, multiplier, first_new_row, batch, tmp_path):
    """One step of pretrain.py's optimizer (AdamW, embedding group) with the new rows' multiplier."""
    from toolkit import training

    args = training.LoopArguments(output_dir=str(tmp_path), learning_rate=1e-2, report_to="none")
    optimizer = training.make_optimizer(model, args)
    new_rows = NewRowsLearningRate(model, first_new_row, multiplier)
    new_rows.remember()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    new_rows.apply()
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_move_multiplier_times_as_far_and_nothing_else_changes(tied, tmp_path):
    """k x the learning rate for rows >= first_new_row, in both matrices (one for a tied head): from the same
    start, one AdamW step moves them exactly k times as far as k = 1; base rows and the body are bit-identical."""
    import copy

    first_new = 96
    start = tiny_llama(tied)
    before = {name: parameter.detach().clone() for name, parameter in start.named_parameters()}
    # every new id, each followed by a target (a sequence's last token gets no gradient)
    batch = torch.cat([torch.arange(first_new, 128).view(2, 16), torch.randint(3, first_new, (2, 6))], dim=1)
    plain = one_adamw_step(copy.deepcopy(start), 1, first_new, batch, tmp_path)
    scaled = one_adamw_step(copy.deepcopy(start), 4, first_new, batch, tmp_path)
    embeddings = {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
    assert embeddings <= set(plain) and ("lm_head.weight" in plain) == (not tied)
    for name in plain:
        if name not in embeddings:
            assert torch.equal(scaled[name], plain[name]), name
            continue
        assert torch.equal(scaled[name][:first_new], plain[name][:first_new]), name
        step = plain[name][first_new:] - before[name][first_new:]
        assert step.abs().min() > 0, name  # every new row is in the batch and moved (Adam: ~lr per element)
        torch.testing.assert_close(scaled[name][first_new:] - before[name][first_new:], 4 * step,
                                   rtol=1e-5, atol=1e-7)


def test_new_rows_multiplier_must_be_positive():
    model = tiny_llama(tied=True)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--new_embeddings_lr_multiplier must be a positive number"):
            NewRowsLearningRate(model, 96, bad)
