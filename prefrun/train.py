"""The training loop every algorithm shares: batches of (chosen + negatives) -> one forward ->
loss from losses.py -> accelerate step. Offline DPO is one call; online rounds call it per round."""

from __future__ import annotations

import logging
import math
import time

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from prefrun.data import Example, collate
from prefrun.errors import PrefrunError
from prefrun.logprobs import sequence_logps
from prefrun.losses import log_reference_noise

log = logging.getLogger(__name__)


class NonFiniteLoss(PrefrunError, RuntimeError):
    pass


def make_accelerator(cfg: DictConfig) -> Accelerator:
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision)


def train(model, tokenizer, examples: list[Example], *, loss_fn, beta: float, sampler, optimizer_factory,
          cfg: DictConfig, accelerator: Accelerator, seed: int, on_log) -> dict:
    """Train `model` in place on `examples` (reference log-probs attached); return the last metrics."""
    generator = torch.Generator().manual_seed(seed)
    columns = sampler.columns(len(examples[0].completion_ids))
    loader = DataLoader(examples, batch_size=cfg.batch_size, shuffle=True, drop_last=len(examples) >= cfg.batch_size,
                        generator=generator, collate_fn=lambda b: collate(b, tokenizer.pad_token_id, columns))
    steps_per_epoch = max(1, len(loader) // cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    optimizer = optimizer_factory(params=[p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()

    step, window, last = 0, _Window(), {}
    bar = tqdm(total=total_steps, desc="train", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    while step < total_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                policy_logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                              batch["completion_mask"]).view(batch["completion_lengths"].shape)
                losses, rewards = loss_fn(policy_logps, batch["reference_logps"], batch["completion_lengths"])
                loss = losses.mean()
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"loss is {loss.item()} at step {step + 1}: lower optim.lr or check the data; "
                                        "the run directory keeps the last good checkpoint")
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.add(loss, policy_logps.detach(), rewards.detach(), batch, beta, grad_norm)
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                last = {"step": step, **window.flush(accelerator), "lr": scheduler.get_last_lr()[0]}
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracy']:.2f}")
                on_log(last)
            if step >= total_steps:
                break
    bar.close()
    return last


class _Window:
    """Running sums of the metrics between two logged steps, kept as tensors (no per-step syncs)."""

    NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
             "logps/rejected", "log_gamma/mean", "log_gamma/frac_positive")

    def __init__(self) -> None:
        self.sums, self.grad_norms = None, []
        self.count, self.tokens, self.start = 0, 0, time.perf_counter()

    def add(self, loss, policy_logps, rewards, batch, beta, grad_norm) -> None:
        log_gamma = log_reference_noise(batch["reference_logps"], beta)
        hardest_negative = rewards[:, 1:].max(dim=1).values
        values = torch.stack([
            loss.detach(),
            rewards[:, 0].mean(),
            rewards[:, 1:].mean(),
            (rewards[:, 0] - hardest_negative).mean(),
            (rewards[:, 0] > hardest_negative).float().mean(),
            policy_logps[:, 0].mean(),
            policy_logps[:, 1:].mean(),
            log_gamma.mean(),
            (log_gamma > 0).float().mean(),
        ]).float()
        self.sums = values if self.sums is None else self.sums + values
        if grad_norm is not None:
            self.grad_norms.append(grad_norm.detach().float() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm))
        self.count += 1
        self.tokens += batch["attention_mask"].sum()

    def flush(self, accelerator: Accelerator) -> dict:
        means = accelerator.reduce(self.sums / self.count, "mean").tolist()
        out = dict(zip(self.NAMES, means))
        if self.grad_norms:
            out["grad_norm"] = accelerator.reduce(torch.stack(self.grad_norms).mean().to(accelerator.device), "mean").item()
        tokens = accelerator.reduce(torch.as_tensor(self.tokens, device=accelerator.device).float(), "sum").item()
        out["tokens_per_s"] = tokens / (time.perf_counter() - self.start)
        self.__init__()
        return out
