"""toolkit/losses.py and per-document attention: the chunked LM-head loss equals the plain loss (values and
gradients), and with per-document positions a token's loss does not depend on the previous document."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from toolkit.losses import chunked_linear_cross_entropy, use_fused_loss
from toolkit.token_shards import IGNORE_INDEX, document_positions


def plain_loss(hidden, weight, labels, num_items_in_batch=None):
    logits = (hidden @ weight.t())[:, :-1].reshape(-1, weight.shape[0])
    targets = labels[:, 1:].reshape(-1)
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                             reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk_size, num_items_in_batch, two_pass):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 300, (3, 11), generator=generator)
    labels[0, 4] = labels[2, 1] = IGNORE_INDEX
    losses, gradients = [], []
    for chunked in (False, True):
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size, num_items_in_batch, two_pass) if chunked \
            else plain_loss(hidden, weight, labels, num_items_in_batch)
        (loss * 3).backward()  # an upstream gradient other than 1
        losses.append(loss.detach())
        gradients.append((hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    assert torch.allclose(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for plain, chunked in zip(*gradients):
        assert torch.allclose(plain, chunked, rtol=1e-10, atol=1e-12)


def test_bf16_head_gradient_in_two_passes_is_as_close_as_one_rounding():
    """16-bit weights over several chunks take two passes: the head gradient is one matmul per row over all
    tokens (rounded once), as close to the fp64 gradient as rounding that gradient to bf16 once."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 96, 32, dtype=torch.float64, generator=generator)
    weight = torch.randn(500, 32, dtype=torch.float64, generator=generator) * 0.1
    labels = torch.randint(0, 500, (1, 96), generator=generator)
    exact_weight = weight.clone().requires_grad_(True)
    chunked_linear_cross_entropy(hidden, exact_weight, labels, 8).backward()
    exact = exact_weight.grad
    low = weight.to(torch.bfloat16).requires_grad_(True)
    chunked_linear_cross_entropy(hidden.to(torch.bfloat16), low, labels, 8).backward()
    error = (low.grad.double() - exact).norm() / exact.norm()
    assert error < 3 * (exact.to(torch.bfloat16).double() - exact).norm() / exact.norm() + 1e-2


def test_fused_loss_on_a_model_equals_its_own_loss(tiny_mistral_path):
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32)
    fused = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32)
    use_fused_loss(fused, "chunked", chunk_size=7)
    ids = torch.randint(3, 32000, (2, 24))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    expected = reference(input_ids=ids, labels=labels)
    got = fused(input_ids=ids, labels=labels)
    assert got.logits is None  # the logits were never held whole
    assert torch.allclose(expected.loss, got.loss, atol=1e-5)
    expected.loss.backward()
    got.loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), fused.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    assert torch.allclose(fused(input_ids=ids).logits, reference(input_ids=ids).logits)  # eval keeps its forward


def token_losses(model, ids, per_document, eos=2):
    """Per-token losses of a block as pretrain.py computes them (positions from the EOS ids)."""
    kwargs = {}
    if per_document:
        kwargs["position_ids"] = torch.from_numpy(document_positions(ids.numpy()[0], eos))[None]
    # use_cache=False as in training: with a KV cache transformers does not look for packed documents
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_tokens_loss_ignores_the_previous_document(attention, tiny_mistral_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_path, dtype=torch.float32, attn_implementation=attention)
    generator = torch.Generator().manual_seed(1)
    document = [1] + torch.randint(3, 32000, (20,), generator=generator).tolist() + [2]
    before_a = [1] + torch.randint(3, 32000, (9,), generator=generator).tolist() + [2]
    before_b = [1] + torch.randint(3, 32000, (13,), generator=generator).tolist() + [2]
    blocks = [torch.tensor([previous + document]) for previous in (before_a, before_b)]
    with torch.no_grad():
        # the losses of the document's tokens after its BOS (targets 2..): the BOS itself is masked in training
        separate = [token_losses(model, block, True)[-len(document) + 1:] for block in blocks]
        crossing = [token_losses(model, block, False)[-len(document) + 1:] for block in blocks]
    assert torch.allclose(separate[0], separate[1], atol=1e-5)
    assert not torch.allclose(crossing[0], crossing[1], atol=1e-3)  # the old behaviour leaks across documents


def test_document_starts_are_not_targets():
    ids = np.array([1, 5, 6, 2, 1, 7, 2, 1, 8])
    positions = document_positions(ids, 2)
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
