"""The causal-LM loss without ever holding the logits whole (120k vocabularies), for pretrain and finetune.

    chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=1024, num_items_in_batch=None) -> loss
                    mean (or sum / num_items_in_batch) next-token cross-entropy of `hidden @ weight.T`,
                    computed `chunk_size` rows at a time: forward and gradient of a chunk are done together
                    (the Liger-Kernel scheme in pure PyTorch), so peak memory holds one chunk's fp32 logits,
                    not B x T x V of them. Exact: tested equal to the plain loss in value and gradients.
    use_fused_loss(model, implementation="chunked"|"liger", chunk_size=1024)
                    replace the model's forward (this instance only) by base model -> last hidden states ->
                    fused loss; `model(input_ids=..., labels=..., position_ids=..., num_items_in_batch=...)`
                    then returns `.loss` (and `.logits` None); without labels it is the model's own forward. Under ZeRO-3 the LM head's partitioned weight is
                    registered as an external parameter of the model, so DeepSpeed gathers it for the forward.
    apply_liger_kernels(model)  Liger's RMSNorm / RoPE / SwiGLU kernels (GPU, `pip install -r requirements-gpu.txt`)

Why not the plain loss: at micro-batch 4 x 4096 x 120k the bf16 logits are 3.9 GB, their fp32 upcast
7.9 GB and the log-softmax another 7.9 GB, ~20 GB for the loss alone.
"""

import types

import torch

IGNORE_INDEX = -100
IMPLEMENTATIONS = ("chunked", "liger", "plain")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, divisor):
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32 sums for bf16 models
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if needs_weight else None
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
            logits = h @ weight.t()
            logits = logits.to(accumulate)  # bf16 -> fp32, one chunk at a time
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target[:, None])[:, 0]) * valid).sum()
            if needs_hidden or needs_weight:
                # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows; in place
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(y), device=y.device), target] -= 1.0
                grad *= valid[:, None]
                grad = grad.to(h.dtype)
                if needs_hidden:
                    grad_hidden[start:start + chunk_size] = grad @ weight
                if needs_weight:
                    grad_weight += (grad.t() @ h).to(accumulate)
        ctx.save_for_backward(grad_hidden if needs_hidden else None,
                              grad_weight.to(weight.dtype) if needs_weight else None)
        ctx.divisor = divisor
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.divisor
        return (grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
                grad_weight * scale.to(grad_weight.dtype) if grad_weight is not None else None,
                None, None, None)


def shift_labels(labels):
    """The targets of positions 0..T-1 (transformers' convention: labels are the input ids)."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=1024, num_items_in_batch=None):
    """Next-token loss of `hidden` (B, T, H) through `weight` (V, H) against `labels` (B, T) (unshifted)."""
    targets = shift_labels(labels).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        divisor = max(int((targets != IGNORE_INDEX).sum()), 1)
    else:
        divisor = float(num_items_in_batch)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, divisor)


def _liger_loss(hidden, weight, labels, num_items_in_batch=None):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    targets = shift_labels(labels).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(weight, hidden, targets)
    total = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(weight, hidden, targets)
    return total / num_items_in_batch


def require_liger():
    """ImportError with what to do, unless Liger-Kernel can run here (CUDA + triton + liger_kernel)."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        raise ImportError("--use_liger_kernel needs a CUDA GPU and `pip install -r requirements-gpu.txt` "
                          "(liger-kernel, triton); on CPU the chunked loss (the default) does the same job")


def apply_liger_kernels(model):
    """Liger's RMSNorm / RoPE / SwiGLU kernels on this model instance (its loss comes from use_fused_loss)."""
    require_liger()
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


def use_fused_loss(model, implementation="chunked", chunk_size=1024):
    """Make `model(...)` compute its loss with the fused LM head + cross-entropy (this instance only)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"loss implementation must be one of {', '.join(IMPLEMENTATIONS)}, not {implementation!r}")
    if implementation == "plain":
        return model
    if implementation == "liger":
        require_liger()
    from transformers.modeling_outputs import CausalLMOutputWithPast

    base_model = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()

    def forward(self, input_ids=None, labels=None, position_ids=None, attention_mask=None,
                num_items_in_batch=None, **kwargs):
        if labels is None:  # evaluation, generation: the model's own forward
            return type(self).forward(self, input_ids=input_ids, position_ids=position_ids,
                                      attention_mask=attention_mask, **kwargs)
        hidden = base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                            use_cache=False, **kwargs).last_hidden_state
        if implementation == "liger":
            loss = _liger_loss(hidden, head.weight, labels, num_items_in_batch)
        else:
            loss = chunked_linear_cross_entropy(hidden, head.weight, labels, chunk_size, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    if hasattr(head.weight, "ds_id"):  # ZeRO-3: gather the head's weight for the model's own forward
        import deepspeed

        deepspeed.zero.register_external_parameter(model, head.weight)
    model.forward = types.MethodType(forward, model)
    return model
