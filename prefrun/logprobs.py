"""Sequence log-probs: one forward over every completion of a batch (chosen and negatives together)."""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch import Tensor


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """Σ log π(y_t | x, y_<t) over completion tokens, one value per row.

    Rows are left-padded (padding, prompt, completion), so every completion ends at the right
    edge: the LM head only runs on the last `K + 1` positions, K the longest completion in the
    batch, instead of on every prompt and padding position. Position ids are counted from the
    first real token, so left padding changes nothing but the numbers' last bits.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    width = int(completion_mask.sum(dim=1).max()) + 1
    kwargs = {"logits_to_keep": width} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs).logits
    logits = logits[:, -width:-1].float()
    targets = input_ids[:, -width + 1 :]
    token_logps = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (token_logps * completion_mask[:, -width + 1 :]).sum(dim=1)


_ACCEPTS: dict[type, bool] = {}


def _accepts_logits_to_keep(model) -> bool:
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    cls = type(inner)
    if cls not in _ACCEPTS:
        _ACCEPTS[cls] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return _ACCEPTS[cls]
