"""toolkit/packing.py: per-document attention reaches the kernel at batch 1 and 4 for flash (stub kernels
through transformers' own flash path), sdpa and flex_attention; the probe reports what the kernel got."""

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from toolkit import packing
from toolkit.token_shards import IGNORE_INDEX, document_positions

EOS = 2
STUB = "stub_flash_attention"


def blocks(rows, length=24, seed=0):
    """`rows` packed blocks: documents of 3..10 tokens ending in EOS, as TokenBlocks gives them."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(rows):
        ids = torch.randint(3, 32000, (length,), generator=generator)
        ends = torch.randint(3, 10, (length,), generator=generator).cumsum(0)
        ids[ends[ends < length]] = EOS
        positions = torch.from_numpy(document_positions(ids.numpy(), EOS))
        labels = ids.clone()
        labels[positions == 0] = IGNORE_INDEX
        examples.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return examples


def per_row_reference(model, examples):
    """Each document run on its own (batch 1, its own positions): the per-token logits per-document
    attention must give."""
    rows = []
    for example in examples:
        ids, positions = example["input_ids"], example["position_ids"]
        starts = (positions == 0).nonzero().view(-1).tolist() + [len(ids)]
        pieces = [model(input_ids=ids[a:b][None]).logits[0] for a, b in zip(starts[:-1], starts[1:])]
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


@pytest.fixture
def stub_flash(monkeypatch):
    """transformers' real flash path (integrations.flash_attention -> _flash_attention_forward) with stub
    kernels in place of the flash_attn package (not installable without CUDA); records every call."""
    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers.integrations.flash_attention import flash_attention_forward

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):  # (B, T, heads, D)
        calls.append(("dense", q.shape[0]))
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale,
                   enable_gqa=True)
        return out.transpose(1, 2)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
               causal=False, **kwargs):  # (tokens, heads, D)
        calls.append(("varlen", cu_seqlens_q.tolist()))
        cut = cu_seqlens_q.tolist()
        pieces = [sdpa(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                       is_causal=True, scale=softmax_scale, enable_gqa=True)[0].transpose(0, 1)
                  for a, b in zip(cut[:-1], cut[1:])]
        return torch.cat(pieces)

    for name, value in (("_loaded_implementation", STUB), ("_flash_fn", dense), ("_flash_varlen_fn", varlen),
                        ("_flash_with_kvcache_fn", None), ("_pad_fn", flash_utils._pad_input),
                        ("_unpad_fn", flash_utils._unpad_input),
                        ("_process_flash_kwargs_fn", flash_utils._lazy_define_process_function(varlen)),
                        ("_process_with_kvcache_kwargs_fn", dict)):
        monkeypatch.setattr(flash_utils, name, value)
    AttentionInterface.register(STUB, flash_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(STUB, flash_attention_mask)
    return calls


def load(path, attention):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("rows", [1, 4])
def test_flash_gets_the_document_boundaries_at_any_batch(rows, stub_flash, tiny_mistral_path):
    model = load(tiny_mistral_path, STUB)
    examples = blocks(rows)
    batch = packing.document_collate(STUB)(examples)
    assert batch["input_ids"].shape == (1, rows * 24)
    probe = packing.DocumentAttentionProbe(model)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        reference = per_row_reference(load(tiny_mistral_path, "sdpa"), examples)
    flat_positions = torch.cat([e["position_ids"] for e in examples])
    expected = (flat_positions == 0).nonzero().view(-1).tolist() + [rows * 24]
    assert {kind for kind, _ in stub_flash} == {"varlen"}
    assert stub_flash[0][1] == expected  # every document's start (and every block's) reached the kernel
    assert torch.allclose(logits.view(rows, 24, -1), reference, atol=1e-4)
    assert probe.result["per_document_attention"] is True


def test_flash_without_flattening_at_batch_4_is_refused(stub_flash, tiny_mistral_path):
    """The old path: the stacked batch calls the dense kernel (documents leak); the probe refuses it."""
    model = load(tiny_mistral_path, STUB)
    batch = packing.stack(blocks(4))
    probe = packing.DocumentAttentionProbe(model)
    with pytest.raises(packing.DocumentAttentionError, match="no document boundaries"):
        with torch.no_grad():
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    assert probe.result["per_document_attention"] is False
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])  # the probe is gone after one pass
    assert stub_flash and {kind for kind, _ in stub_flash} == {"dense"}


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("rows", [1, 4])
def test_masked_kernels_keep_documents_apart_at_any_batch(attention, rows, tiny_mistral_path):
    # a fresh compile per shape: inductor's CPU code for flex_attention's dynamic-shape recompile
    # (batch 1, then 4) does not build with torch 2.13 (CppCompileError); GPUs use Triton
    torch.compiler.reset()
    model = load(tiny_mistral_path, attention)
    examples = blocks(rows, seed=rows)
    batch = packing.document_collate(attention)(examples)
    assert batch["input_ids"].shape == (rows, 24)  # no flattening needed: the mask is per row
    probe = packing.DocumentAttentionProbe(model)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        reference = per_row_reference(load(tiny_mistral_path, "sdpa"), examples)
    assert torch.allclose(logits, reference, atol=1e-4)
    assert probe.result["per_document_attention"] is True
    assert probe.result["documents_after_the_first_in_a_row"] > 0


def test_the_probe_waits_for_a_micro_batch_with_documents_to_keep_apart(tiny_mistral_path):
    model = load(tiny_mistral_path, "sdpa")
    probe = packing.DocumentAttentionProbe(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 32000, (2, 24)))  # positions 0..23: one document per row
        assert probe.result is None and probe.micro_batches_without_boundaries == 1
        batch = packing.stack(blocks(2))
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    assert probe.result["per_document_attention"] is True and probe.result["micro_batches_before"] == 1
