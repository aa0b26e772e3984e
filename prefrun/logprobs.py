"""Sequence log-probs: one forward over every completion of a batch (chosen and negatives together).

Two batch layouts (prefrun/data/batches.py builds both):
- padded: rows left-padded to one width, so every completion ends at the right edge and the LM head
  only runs on the last K + 1 positions (K the longest completion);
- packed (padding-free): the rows concatenated into one row with position ids restarting per sequence.
  Attention stays inside each sequence: with flash attention through transformers' own packed path
  (cu_seqlens from the position ids), with SDPA through `packed_sdpa` below, which runs SDPA on each
  sequence's slice (exact, and no T² mask for causal attention). `check_packing` verifies it once per
  model against padded rows and sends a model that disagrees back to padded rows. The LM head runs on
  the completion positions only.

When the logits of a batch would exceed `logits_budget_mb` (large vocabularies), the LM head and
log-softmax run in chunks of positions (`ChunkedTokenLogps`, the head recomputed in the backward), so
the memory for logits stays at about the budget whatever the vocabulary size.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prefrun import distributed

log = logging.getLogger(__name__)

PACKED_SDPA = "prefrun_packed_sdpa"
LENGTHS_KEY = "prefrun_sequence_lengths"  # forward kwarg: the length of each sequence in the packed row


def sequence_logps(model, batch: dict[str, Tensor], *, logits_budget_mb: float = 256.0) -> Tensor:
    """Σ log π(y_t | x, y_<t) over completion tokens, one value per row (sequence) of `batch`."""
    if "position_ids" in batch:
        positions, targets, rows = batch["logit_positions"], batch["targets"], batch["token_rows"]
        num_rows = len(batch["sequence_lengths"])
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **_packed_kwargs(model, batch)}
        keep, logit_count = positions, len(positions)
    else:
        attention_mask, completion_mask = batch["attention_mask"], batch["completion_mask"]
        # Position ids count from the first real token, so left padding changes nothing but the last bits.
        inputs = {"input_ids": batch["input_ids"], "attention_mask": attention_mask,
                  "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0)}
        num_rows, width = batch["input_ids"].shape[0], int(completion_mask.sum(dim=1).max()) + 1
        keep, logit_count = width, num_rows * width
    head = None
    if logit_count * _vocab_size(model) * 4 > logits_budget_mb * 2**20:
        head = chunkable_head(model)
    if head is None:
        logits = model(**inputs, **_keep(model, keep)).logits
        if "position_ids" in batch:
            token_logps = -F.cross_entropy(logits[0].float(), targets, reduction="none")
            return torch.zeros(num_rows, device=logits.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
        logits = logits[:, -width:-1].float()
        token_logps = -F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, -width + 1 :],
                                       reduction="none")
        return (token_logps * completion_mask[:, -width + 1 :]).sum(dim=1)
    # Large vocabulary: take the final hidden states (the model still computes the logits of one position,
    # which also checks that the chunked head reproduces the model's own) and run the head in chunks.
    out = model(**inputs, **_keep(model, 1), output_hidden_states=True)
    hidden = out.hidden_states[-1]
    _check_head(model, head, hidden[:, -1], out.logits[:, -1])
    if "position_ids" not in batch:
        tail = completion_mask[:, -width + 1 :].bool()
        rows = torch.arange(num_rows, device=hidden.device)[:, None].expand_as(tail)[tail]
        targets = batch["input_ids"][:, -width + 1 :][tail]
        hidden = hidden[:, -width:-1][tail]
    else:
        hidden = hidden[0, positions]
    chunk = max(1, int(logits_budget_mb * 2**20 // (4 * head.weight.shape[0])))
    token_logps = ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk)
    return torch.zeros(num_rows, device=hidden.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[target] for each position, `chunk` positions at a time: the [positions × vocab]
    logits never exist at once. The backward recomputes each chunk's logits (one more head matmul) and
    uses d logp / d logits = onehot(target) − softmax. Runs under the caller's autocast in both passes."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        device = hidden.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            logits = F.linear(hidden[start:end], weight, bias).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            out[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        device = hidden.device.type
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.autocast(device, dtype=ctx.autocast or torch.bfloat16, enabled=ctx.autocast is not None):
            for start in range(0, hidden.shape[0], ctx.chunk):
                end = start + ctx.chunk
                h = hidden[start:end]
                probs = torch.exp(F.linear(h, weight, bias).float() - lse[start:end, None])
                grad_logits = -probs * grad_out[start:end, None]
                grad_logits.scatter_add_(1, targets[start:end, None], grad_out[start:end, None])
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad_logits.to(h.dtype) @ weight.to(h.dtype)).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad_logits.t().to(h.dtype) @ h).float()
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None


def use_packed_attention(model) -> bool:
    """Make `model` able to run packed rows: SDPA models switch to `packed_sdpa` (the same SDPA on unpacked
    batches), flash-attention models already can. False for any other attention implementation.
    `check_packing` then verifies it on the first real batch."""
    inner = _unwrap(model)
    if _VERDICTS.get(inner) is False:
        return False
    config = inner.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == "sdpa":
        config._attn_implementation = PACKED_SDPA
        return True
    return implementation == PACKED_SDPA or str(implementation).startswith("flash_attention")


def packs(model) -> bool:
    """Whether `model` runs packed rows (see `use_packed_attention`), unless `check_packing` refused them."""
    inner = _unwrap(model)
    implementation = str(getattr(inner.config, "_attn_implementation", None))
    return (implementation == PACKED_SDPA or implementation.startswith("flash_attention")) and _VERDICTS.get(inner, True)


_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> packed rows agree with padded


def packing_checked(model) -> bool:
    """Whether `check_packing` has given its verdict on `model`."""
    return _unwrap(model) in _VERDICTS


@torch.no_grad()
def check_packing(model, packed: dict[str, Tensor], padded: dict[str, Tensor], *,
                  logits_budget_mb: float = 256.0, together: bool = False) -> bool:
    """Once per model, on the first batch it packs (`packed`, and the same rows `padded`): do packed rows give
    the log-probs that padded rows give under the model's own attention? Modelling code can make them differ:
    attention that leaks across sequences, or code that tests for "sdpa" by name and takes another path
    after the switch to `packed_sdpa`. If they differ, the model goes back to its own attention, `packs`
    answers False from then on (callers pad), and a warning says so. fp32: a tolerance of rounding; 16-bit
    weights or autocast: a looser one (crossing sequences moves log-probs by whole nats). `together`: every
    process calls it at once, each on its own batch, and all take one verdict (packed only if every batch
    agrees): a process that packed where another padded would train on numbers the check refused."""
    inner = _unwrap(model)
    if inner in _VERDICTS:
        return _VERDICTS[inner]
    implementation = inner.config._attn_implementation
    parameter = next(model.parameters())
    exact = parameter.dtype == torch.float32 and not torch.is_autocast_enabled(parameter.device.type)
    was_training = model.training
    model.eval()  # no dropout: the two passes must see the same function
    try:
        ours = sequence_logps(model, packed, logits_budget_mb=logits_budget_mb)
        if implementation == PACKED_SDPA:
            inner.config._attn_implementation = "sdpa"  # padded rows through the model's own SDPA path
        try:
            theirs = sequence_logps(model, padded, logits_budget_mb=logits_budget_mb)
        finally:
            inner.config._attn_implementation = implementation
    finally:
        model.train(was_training)
    diff, scale = (ours.float() - theirs.float()).abs().max().item(), theirs.float().abs().max().item()
    agrees = diff <= (1e-3 + 1e-5 * scale if exact else 0.1 + 2e-3 * scale)
    if together:
        checks = distributed.gather((agrees, diff))
        agrees, diff = all(ok for ok, _ in checks), max(d for _, d in checks)
    _VERDICTS[inner] = agrees
    if agrees:
        log.info("padding-free batches: packed and padded log-probs agree to %.2g on the first batch", diff)
        return True
    if implementation == PACKED_SDPA:
        inner.config._attn_implementation = "sdpa"
    log.warning("trainer.padding_free=true: on %s packed rows give log-probs %.3g away from padded rows under its own "
                "attention (%s), so this run pads its batches (trainer.padding_free=false skips this check)",
                type(inner).__name__, diff, "sdpa" if implementation == PACKED_SDPA else implementation)
    return False


def packed_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention, but on a packed row (kwarg `prefrun_sequence_lengths`) SDPA runs on each
    sequence's own slice: exact block-diagonal attention without a [T × T] mask. Causal unless the model built a
    mask for the row (a sliding window longer rows exceed): then each sequence gets its diagonal block of it,
    which is that sequence's own mask, positions restarting with it. (`split`, not slicing: its backward is
    one concatenation, where each slice's would fill a zero tensor of the whole row.)"""
    lengths = kwargs.pop(LENGTHS_KEY, None)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    masks = [None] * len(lengths)
    if attention_mask is not None:
        ends = itertools.accumulate(lengths)
        masks = [attention_mask[..., end - n : end, end - n : end] for n, end in zip(lengths, ends)]
    outputs = [sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                      is_causal=mask is None, **kwargs)[0]
               for q, k, v, mask in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                                        value.split(lengths, dim=2), masks)]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def _packed_kwargs(model, batch: dict[str, Tensor]) -> dict:
    implementation = getattr(_unwrap(model).config, "_attn_implementation", None)
    if implementation == PACKED_SDPA:
        # An all-ones mask: transformers then builds no [T × T] mask for plain causal attention (and does not
        # derive one from the restarting positions); where it builds one (sliding windows), packed_sdpa uses
        # its diagonal blocks.
        return {"attention_mask": torch.ones_like(batch["input_ids"]), LENGTHS_KEY: batch["sequence_lengths"].tolist()}
    if str(implementation).startswith("flash_attention"):
        return {}  # no mask: transformers derives cu_seqlens from the restarting position ids
    raise ValueError(f"packed batches need SDPA or flash attention, not {implementation!r}; "
                     "call use_packed_attention(model) first")


def chunkable_head(model):
    """The model's LM head when it is a plain Linear applied to the final hidden states (so the chunked
    path computes exactly what the model does), else None."""
    inner = _unwrap(model)
    config = inner.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.weight.dim() != 2:  # e.g. a LoRA-wrapped or sharded head
        return None
    return head


_HEAD_CHECKED: set[type] = set()


def _check_head(model, head, hidden: Tensor, logits: Tensor) -> None:
    """Once per model class: the chunked head's logits at one position equal the model's own."""
    cls = type(_unwrap(model))
    if cls in _HEAD_CHECKED:
        return
    with torch.no_grad():
        ours = F.linear(hidden, head.weight, head.bias).float()
        diff = (ours - logits.float()).abs().max().item()
    if diff > 1e-3 * max(1.0, logits.float().abs().max().item()):
        raise RuntimeError(f"{cls.__name__}: the LM head applied to the final hidden states differs from the "
                           f"model's logits by {diff:.3g}, so chunked log-probs would be wrong for this model; "
                           "raise trainer.logits_budget_mb so that the logits are computed whole")
    _HEAD_CHECKED.add(cls)


def _vocab_size(model) -> int:
    head = _unwrap(model).get_output_embeddings()
    return head.weight.shape[0] if head is not None and hasattr(head, "weight") else _unwrap(model).config.vocab_size


def _unwrap(model):
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return inner


_ACCEPTS: dict[type, bool] = {}


def _keep(model, keep) -> dict:
    """`logits_to_keep` where the model takes it (an int: the last positions; a tensor: those positions)."""
    cls = type(_unwrap(model))
    if cls not in _ACCEPTS:
        _ACCEPTS[cls] = "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
    if not _ACCEPTS[cls]:
        if torch.is_tensor(keep):
            raise ValueError(f"{cls.__name__} does not take logits_to_keep: packed batches need it")
        return {}
    return {"logits_to_keep": keep}
