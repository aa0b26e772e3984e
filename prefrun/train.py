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

from prefrun.checkpoint import Checkpoints
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
    # cpu=True on a machine without CUDA: that is what makes several processes use gloo (MULTI_CPU).
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
                       cpu=not torch.cuda.is_available())


def train(model, tokenizer, examples: list[Example], *, loss_fn, beta: float, sampler, optimizer_factory,
          cfg: DictConfig, accelerator: Accelerator, seed: int, on_log, checkpoints: Checkpoints | None = None,
          on_resume=None) -> dict:
    """Train `model` in place on `examples` (reference log-probs attached); return the last metrics.

    If `checkpoints` holds a checkpoint, training continues from it: weights, optimiser, scheduler,
    RNG, the position in the data and the partly filled metrics window, so that the resumed run
    ends where an uninterrupted one would.
    """
    columns = sampler.columns(len(examples[0].completion_ids))
    optimizer = optimizer_factory(params=[p for p in model.parameters() if p.requires_grad])
    batches_per_epoch = len(accelerator.prepare(_epoch_loader(examples, cfg, tokenizer, columns, seed, 0)))
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * max(1, batches_per_epoch // cfg.grad_accum))
    # accelerate steps a prepared scheduler once per process at every optimiser step: count in those units.
    processes = accelerator.num_processes
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps) * processes,
                              num_training_steps=total_steps * processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()

    state, window, last = {"step": 0, "micro_batches": 0}, _Window(), {}
    resume_from = checkpoints.latest() if checkpoints else None
    if resume_from:
        state = checkpoints.load(accelerator, resume_from)
        window.restore(state.pop("window"), accelerator.device)
        log.info("resuming from %s (step %d of %d)", resume_from, state["step"], total_steps)
        if on_resume:
            on_resume(state["step"])
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    while state["step"] < total_steps:
        epoch, offset = divmod(state["micro_batches"], batches_per_epoch)
        loader = accelerator.prepare(_epoch_loader(examples, cfg, tokenizer, columns, seed, epoch))
        for batch in accelerator.skip_first_batches(loader, offset) if offset else loader:
            state["micro_batches"] += 1
            with accelerator.accumulate(model):
                policy_logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                              batch["completion_mask"]).view(batch["completion_lengths"].shape)
                losses, rewards = loss_fn(policy_logps, batch["reference_logps"], batch["completion_lengths"])
                loss = losses.mean()
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"loss is {loss.item()} at step {state['step'] + 1}: lower optim.lr or check "
                                        "the data; the run directory keeps the last good checkpoint")
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
            state["step"] += 1
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                last = {"step": state["step"], **window.flush(accelerator), "lr": scheduler.get_last_lr()[0]}
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracy']:.2f}")
                on_log(last)
            if checkpoints and checkpoints.due(state["step"]) and state["step"] < total_steps:
                checkpoints.save(accelerator, {**state, "window": window.state()})
            if state["step"] >= total_steps:
                break
    bar.close()
    return last


def _epoch_loader(examples, cfg: DictConfig, tokenizer, columns, seed: int, epoch: int) -> DataLoader:
    """Epoch `e` visits the examples in a permutation fixed by (seed, e): a resumed run can find its place."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return DataLoader(examples, batch_size=cfg.batch_size, sampler=order, drop_last=len(examples) >= cfg.batch_size,
                      collate_fn=lambda b: collate(b, tokenizer.pad_token_id, columns))


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

    def state(self) -> dict:
        """What a checkpoint keeps of a partly filled window (timing restarts on resume)."""
        return {"sums": None if self.sums is None else self.sums.tolist(), "count": self.count,
                "grad_norms": [float(g) for g in self.grad_norms], "tokens": int(self.tokens)}

    def restore(self, saved: dict, device) -> None:
        self.sums = None if saved["sums"] is None else torch.tensor(saved["sums"], device=device)
        self.count, self.tokens = saved["count"], saved["tokens"]
        self.grad_norms = [torch.tensor(g) for g in saved["grad_norms"]]

    def flush(self, accelerator: Accelerator) -> dict:
        means = accelerator.reduce(self.sums / self.count, "mean").tolist()
        out = dict(zip(self.NAMES, means))
        if self.grad_norms:
            out["grad_norm"] = accelerator.reduce(torch.stack(self.grad_norms).mean().to(accelerator.device), "mean").item()
        tokens = accelerator.reduce(torch.as_tensor(self.tokens, device=accelerator.device).float(), "sum").item()
        out["tokens_per_s"] = tokens / (time.perf_counter() - self.start)
        self.__init__()
        return out
