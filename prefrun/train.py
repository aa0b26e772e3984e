"""The training loop every algorithm shares: batches of (chosen + negatives) -> one forward ->
loss from losses.py -> accelerate step. Offline DPO is one call; online rounds call it per round."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import time
import warnings

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from prefrun import distributed, faults, preemption
from prefrun.checkpoint import Checkpoints
from prefrun.data import Example, candidate_logps, collate, to_device
from prefrun.data.reference import idle_forward
from prefrun.errors import InputError, PrefrunError
from prefrun.logprobs import check_packing, packing_checked, sequence_logps, use_packed_attention
from prefrun.losses import log_reference_noise, pool_log_softmax_loss
from prefrun.model import keep_fp32_masters, resharded, restore_fp32_masters
from prefrun.samplers import effective_sample_size, rank_under

log = logging.getLogger(__name__)


class NonFiniteLoss(PrefrunError, RuntimeError):
    pass


def mixed_precision(setting: str) -> str:
    """trainer.mixed_precision as accelerate takes it: auto is bf16 on a GPU that has it, else no (fp32)."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# The trainer's counts (those whose default is null are beyond `cli._check_value_types`' reach).
_COUNTS = ("max_steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_last", "reference_batch_size")


def make_accelerator(cfg: DictConfig) -> Accelerator:
    for key in (*_COUNTS, "epochs"):  # (epochs may be a fraction)
        value = cfg.get(key)
        kinds = (int, float) if key == "epochs" else int
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            what = "a number" if key == "epochs" else "a whole number"
            raise InputError(f"trainer.{key}={value!r}: give {what} (or null where the default is null)")
    precision = mixed_precision(cfg.mixed_precision)
    if not torch.cuda.is_available():  # accelerate imports DeepSpeed (when installed) to unwrap any model, and
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own detection warns on every process of a CPU job
    # A collective waits this long for the slowest process (a long judge or engine start on one of them).
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.get("dist_timeout_s") or 1800))
    fsdp_config = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    deepspeed_config = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    sharded_on_cpu = bool(cfg.get("cpu_fsdp")) and not torch.cuda.is_available() and fsdp_config
    zero_on_cpu = bool(cfg.get("cpu_deepspeed")) and not torch.cuda.is_available() and deepspeed_config
    # cpu=True on a machine without CUDA: that is what makes several processes use gloo (MULTI_CPU).
    with _fsdp_on_cpu() if sharded_on_cpu else _deepspeed_on_cpu() if zero_on_cpu else contextlib.nullcontext():
        accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
                                  cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])
    _deepspeed_settings(accelerator, cfg)
    _same_accumulation(accelerator, cfg)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if accelerator.is_main_process and launcher != "no" and launcher != precision:
        log.warning("the launcher asked for mixed precision %s (accelerate launch --mixed_precision, or its config "
                    "file) and prefrun runs %s: trainer.mixed_precision=%s decides; set trainer.mixed_precision=%s "
                    "to follow the launcher", launcher, precision, cfg.mixed_precision, launcher)
    if accelerator.is_main_process and fsdp_config and not torch.cuda.is_available() and not cfg.get("cpu_fsdp"):
        log.info("an FSDP config on CPU processes: accelerate trains it as multi-process DDP; trainer.cpu_fsdp=true "
                 "runs FSDP2 for real (sharded weights, optimiser state and checkpoints)")
    if accelerator.is_main_process and deepspeed_config and not torch.cuda.is_available() and not zero_on_cpu:
        log.info("a DeepSpeed config on CPU processes: accelerate trains it as multi-process DDP; "
                 "trainer.cpu_deepspeed=true runs DeepSpeed for real (its CPU accelerator, over gloo)")
    if accelerator.is_main_process and cfg.get("cpu_deepspeed") and not zero_on_cpu:
        log.warning("trainer.cpu_deepspeed=true: %s", "this machine has GPUs, where a DeepSpeed config runs "
                    "DeepSpeed anyway" if torch.cuda.is_available() else "no DeepSpeed config was launched "
                    "(accelerate launch --config_file docs/accelerate/deepspeed_zero3.yaml ...): the key does nothing")
    if accelerator.is_main_process and cfg.get("cpu_fsdp") and not sharded_on_cpu:
        log.warning("trainer.cpu_fsdp=true: %s", "this machine has GPUs, where an FSDP config runs FSDP anyway"
                    if torch.cuda.is_available() else "no FSDP config was launched (accelerate launch --config_file "
                    "docs/accelerate/fsdp.yaml ...): nothing to shard, the key does nothing")
    return accelerator


def _same_accumulation(accelerator: Accelerator, cfg: DictConfig) -> None:
    """trainer.grad_accum is what prefrun counts optimiser steps, epochs, the scheduler and a checkpoint's place in
    the data by: an accelerate config (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) or a DeepSpeed config with a
    gradient_accumulation_steps of its own, which accelerate would use instead, must agree with it."""
    found = {"the accelerate config's gradient_accumulation_steps": accelerator.gradient_accumulation_steps}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        value = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_accumulation_steps", "auto")
        if value != "auto":
            found["the DeepSpeed config's gradient_accumulation_steps"] = int(value)
    for where, value in found.items():
        if value != cfg.grad_accum:
            raise InputError(f"{where} is {value} and trainer.grad_accum={cfg.grad_accum}: prefrun counts optimiser "
                             f"steps, epochs and checkpoints by trainer.grad_accum; give trainer.grad_accum={value}, "
                             "or leave the key out of that config")


def _deepspeed_settings(accelerator: Accelerator, cfg: DictConfig) -> None:
    """What DeepSpeed's config leaves to the trainer ("auto", or absent), from prefrun's keys: the batch per
    process (`train_micro_batch_size_per_gpu` = trainer.batch_size: prefrun prepares its batches apart from the
    model, so accelerate cannot read it off a data loader, and stops at prepare() without it) and the clipping
    (`gradient_clipping` = trainer.max_grad_norm: DeepSpeed clips inside its step, where accelerate's
    clip_grad_norm_ does nothing, and accelerate would fill in 1.0). A value the user's DeepSpeed config sets
    itself is kept; a different max_grad_norm is said in a line."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = int(cfg.batch_size)
    wanted = float(cfg.max_grad_norm or 0.0)  # 0: DeepSpeed does not clip
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = wanted
    elif float(config["gradient_clipping"]) != wanted and accelerator.is_main_process:
        log.warning("the DeepSpeed config clips gradients at %s, not at trainer.max_grad_norm=%s: DeepSpeed's value "
                    "is used", config["gradient_clipping"], cfg.max_grad_norm)


@contextlib.contextmanager
def _deepspeed_on_cpu():
    """`_fsdp_on_cpu` for DeepSpeed (`trainer.cpu_deepspeed`): accelerate runs a DeepSpeed config on CPU
    processes as multi-process DDP; DeepSpeed itself runs there (its CPU accelerator, collectives over the gloo
    group accelerate starts), so this lifts the job to accelerate's DeepSpeed path while the Accelerator is
    built, with the plugin accelerate read from the launcher's variables: ZeRO partitions, DeepSpeed's own
    checkpoints, the checkpoint-final DeepSpeed gathers, as on GPUs."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _without_shm_comm()
    # DeepSpeed's CPU collectives call torch's deprecated names: four FutureWarnings an optimiser step otherwise
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)

    def lift(state, plugin) -> None:
        plugin.set_mixed_precision(state._mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin

    with _lifted_on_cpu("deepspeed_plugin", DistributedType.DEEPSPEED, lift):
        yield


def _without_shm_comm() -> None:
    """DeepSpeed's CPU accelerator compiles a C++ shared-memory all-reduce (`deepspeed_shm_comm`, with ninja and the
    system compiler) the first time a job starts in a new environment: 36 s on this machine's fresh CI
    environment, and a machine without a compiler would stop there. The CPU rehearsal reduces over gloo, as the
    rest of the job does: DeepSpeed reads which of its ops may be built from `deepspeed.ops.__compatible_ops__`
    (a dict it keeps for edits like this one), and this marks that one unavailable."""
    import deepspeed.ops

    probed = deepspeed.ops.__dict__.get("__compatible_ops__") or {}  # DeepSpeed probes on first use (compiler calls)
    deepspeed.ops.__compatible_ops__ = {**probed, "deepspeed_shm_comm": False}


@contextlib.contextmanager
def _fsdp_on_cpu():
    """accelerate wraps a model with FSDP on accelerators only: under an FSDP config, CPU processes silently get
    multi-process DDP. With `trainer.cpu_fsdp` the job runs accelerate's own FSDP path on the CPU processes
    (torch's fully_shard over a gloo mesh): sharded parameters, gradients and optimiser state, sharded
    checkpoints through torch.distributed.checkpoint, gathered final weights, so a sharded job can be rehearsed
    (and tested) without a GPU. accelerate's state keeps a CPU job at MULTI_CPU; this lifts it to FSDP while
    the Accelerator is built, with the plugin accelerate read from the launcher's FSDP_* variables."""

    def lift(state, plugin) -> None:
        state.fsdp_plugin = plugin
        if state._mixed_precision != "no":
            plugin.set_mixed_precision(state._mixed_precision)

    with _lifted_on_cpu("fsdp_plugin", DistributedType.FSDP, lift):
        yield


@contextlib.contextmanager
def _lifted_on_cpu(plugin_key: str, distributed_type: DistributedType, lift):
    """While the block runs, an AcceleratorState that accelerate would leave at MULTI_CPU although it was given
    a plugin (`plugin_key`: fsdp_plugin, deepspeed_plugin) becomes `distributed_type`, the plugin installed by
    `lift(state, plugin)`."""
    init = AcceleratorState.__init__

    def init_lifted(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = kwargs.get(plugin_key)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = distributed_type
            lift(self, plugin)
            PartialState._shared_state["distributed_type"] = distributed_type

    AcceleratorState.__init__ = init_lifted
    try:
        yield
    finally:
        AcceleratorState.__init__ = init


def train(model, tokenizer, examples: list[Example], *, loss_fn, beta: float, sampler, optimizer_factory,
          cfg: DictConfig, accelerator: Accelerator, seed: int, on_log, checkpoints: Checkpoints | None = None,
          on_resume=None) -> dict:
    """Train `model` in place on `examples` (reference log-probs attached); return the last metrics.

    Each micro-batch: the columns that enter the loss (pairs: as given; pools: the chosen one plus the
    negatives the sampler draws after a no-grad scoring pass) -> one forward with gradient over those rows
    (a candidate drawn twice is computed once) -> loss -> accelerate step.

    If `checkpoints` holds a checkpoint, training continues from it: weights, optimiser, scheduler,
    RNG, the position in the data and the partly filled metrics window, so that the resumed run
    ends where an uninterrupted one would (negatives are drawn from a generator seeded by the position).
    """
    pad_id = tokenizer.pad_token_id
    if cfg.get("disable_dropout", True):
        disable_dropout(model)
    packed = bool(cfg.get("padding_free")) and _packs(model)
    draws = PoolDraws(sampler, examples, beta=beta, pad_id=pad_id, seed=seed,
                      batch_size=(cfg.reference_batch_size or cfg.batch_size) * 2) if sampler.uses_pools else None
    columns = None if draws else _fixed_columns(sampler, examples)
    lengths = [len(ex.prompt_ids) + max(len(c) for c in ex.completion_ids) for ex in examples]
    processes = accelerator.num_processes
    first_epoch = _epoch_loader(lengths, cfg, seed, 0, processes)
    batches_per_epoch = len(accelerator.prepare(first_epoch))
    if batches_per_epoch == 0:  # fewer examples than processes
        raise InputError(f"{len(examples)} training example(s), fewer than the {processes} processes: give more "
                         "prompts or data, or run fewer processes")
    if len(examples) < cfg.batch_size * processes and processes > 1:
        log.warning("%d training examples, fewer than one global batch (trainer.batch_size=%d x %d processes): each "
                    "process trains on %d of them a step%s", len(examples), cfg.batch_size, processes,
                    first_epoch.batch_size, f" ({len(examples) % processes} left out)" if len(examples) % processes
                    else "")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * max(1, batches_per_epoch // cfg.grad_accum))
    # accelerate steps a prepared scheduler once per process at every optimiser step: count in those units.
    budget = cfg.get("logits_budget_mb") or float("inf")
    if packed and not packing_checked(model):  # before prepare(). Every process checks at once, each on its own
        # first batch, and all take one verdict (a sharded model's forwards are collectives; reference scoring on
        # several processes checks on all of them together, so none has a verdict here that another lacks)
        first = [examples[i] for i in next(iter(first_epoch)).tolist()]
        shared = columns or list(range(min(len(ex.completion_ids) for ex in first)))  # pools may differ in size
        batch, padded = (to_device(collate(first, pad_id, shared, packed=p), accelerator.device) for p in (True, False))
        packed = check_packing(model, batch, padded, logits_budget_mb=budget, together=processes > 1)
    # A sharded model that made forwards (pools, reference, evaluation, the check above) holds its root module's
    # parameters gathered: the optimiser must get the shards, which training updates, not the gathered copies.
    resharded(model)
    optimizer = optimizer_factory(params=[p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps) * processes,
                              num_training_steps=total_steps * processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # in 16 bits: the fp32 masters the last round left, not their rounding (a checkpoint wins)
        restore_fp32_masters(model)
    model.train()

    state, window, last = {"step": 0, "micro_batches": 0}, _Window(), {}
    layout = {"trainer.batch_size": cfg.batch_size, "trainer.grad_accum": cfg.grad_accum, "examples": len(examples)}
    resume_from = checkpoints.latest() if checkpoints else None
    if resume_from:
        state, tensors = checkpoints.load(accelerator, resume_from)
        if draws:
            draws.restore(tensors)
        made = state.pop("layout", layout)
        scale = _same_steps(made, layout, cfg, processes, resume_from)
        window.restore(state.pop("window"), accelerator.device, scale=scale)
        if made != layout:  # the same optimiser steps, cut into other micro-batches
            state["micro_batches"] = state["step"] * cfg.grad_accum
            accelerator.step = state["micro_batches"] % batches_per_epoch  # accelerate's count towards a sync
            log.info("resuming with trainer.batch_size=%d, trainer.grad_accum=%d (the checkpoint's: %d, %d): the same "
                     "optimiser steps over the same examples", cfg.batch_size, cfg.grad_accum,
                     made["trainer.batch_size"], made["trainer.grad_accum"])
        last = state.pop("last", {})  # a run stopped at its last step resumes with nothing left to do
        log.info("resuming from %s (step %d of %d)", resume_from, state["step"], total_steps)
        if on_resume:
            on_resume(state["step"])
    # The bar is closed however the loop ends, so that a stopping line is printed on a line of its own. A stop
    # signal waits for the step boundary in the loop.
    with tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True,
              disable=not accelerator.is_local_main_process) as bar, preemption.at_step_boundaries():
        while state["step"] < total_steps:
            epoch, offset = divmod(state["micro_batches"], batches_per_epoch)
            loader = accelerator.prepare(_epoch_loader(lengths, cfg, seed, epoch, processes))
            for indices in accelerator.skip_first_batches(loader, offset) if offset else loader:
                state["micro_batches"] += 1
                chunk = [examples[i] for i in indices.tolist()]
                pool_metrics = {}
                if draws:
                    # The prepared model (not unwrapped): sharded weights (FSDP) and autocast work as in training.
                    columns, pool_metrics = draws(model, indices.tolist(), state)
                batch = collate(chunk, pad_id, columns, packed=packed)
                tokens = int(batch["sequence_lengths"].sum())
                batch = to_device(batch, accelerator.device)
                with accelerator.accumulate(model):
                    row_logps = sequence_logps(model, batch, logits_budget_mb=budget)
                    policy_logps = row_logps[batch["row_index"]]
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
                window.add(_step_metrics(loss, policy_logps.detach(), rewards.detach(), batch, beta, pool_metrics),
                           tokens, grad_norm, accelerator.device)
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                bar.update(1)
                if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                    last = {"step": state["step"], **window.flush(accelerator), "lr": scheduler.get_last_lr()[0]}
                    bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracy']:.2f}")
                    on_log(last)
                saved = checkpoints and checkpoints.due(state["step"]) and state["step"] < total_steps
                if saved:
                    checkpoints.save(accelerator, {**state, "window": window.state(), "last": last, "layout": layout},
                                     draws and draws.state())
                faults.inject("train")
                signum = preemption.requested(accelerator)
                if signum:
                    where = f"at step {state['step']} of {total_steps}"
                    if checkpoints:
                        if not saved:
                            checkpoints.save(accelerator, {**state, "window": window.state(), "last": last,
                                                           "layout": layout}, draws and draws.state())
                        where += f" (checkpoint {checkpoints.path(state['step'])})"
                    raise preemption.Preempted(signum, where)
                if state["step"] >= total_steps:
                    break
    if deepspeed:
        keep_fp32_masters(model)
    else:  # past the last step the optimiser's state (AdamW: two fp32 copies of the trainable weights) serves
        optimizer.state.clear()  # nothing: the evaluation, and a sleeping engine's wake-up, get its memory
    return last


def _same_steps(made: dict, layout: dict, cfg: DictConfig, processes: int, path) -> float:
    """A checkpoint written with other micro-batches (`made`: trainer.batch_size, trainer.grad_accum, the number of
    examples) resumes when each optimiser step still takes the same examples (every epoch's permutation is cut into
    global batches of batch_size x grad_accum x processes examples; the processes are the checkpoint's): what a run
    out of memory needs, half the batch and twice the accumulation. Returns the factor that turns the checkpoint's
    micro-batches into this run's (its metrics window counts micro-batches); refuses, in one line, any other change."""
    if made == layout:
        return 1.0
    batch, accum = made["trainer.batch_size"], made["trainer.grad_accum"]
    if made["examples"] != layout["examples"]:
        why = f"on {made['examples']} training examples, and this run has {layout['examples']}: resume on the same data"
    elif batch * accum != cfg.batch_size * cfg.grad_accum:
        why = (f"with trainer.batch_size x trainer.grad_accum = {batch} x {accum}, and this run has {cfg.batch_size} x "
               f"{cfg.grad_accum}: keep the product (an optimiser step's examples), e.g. trainer.batch_size="
               f"{max(1, batch // 2)} trainer.grad_accum={accum * 2 if batch > 1 else accum}")
    elif layout["examples"] < batch * accum * processes:
        why = (f"with trainer.batch_size={batch} trainer.grad_accum={accum} on fewer examples than one optimiser step "
               "(each epoch is one step, cut by the batch size): resume with the same batches")
    elif cfg.get("group_by_length") and batch != cfg.batch_size:
        why = (f"with trainer.batch_size={batch}, and trainer.group_by_length sorts windows of batches by length (the "
               "order depends on the batch size): resume with the same trainer.batch_size")
    else:
        return cfg.grad_accum / accum
    raise InputError(f"{path} was made {why}; or start a new run directory")


def _fixed_columns(sampler, examples: list[Example]) -> list[int]:
    sizes = {len(ex.completion_ids) for ex in examples}
    if len(sizes) > 1:
        raise InputError(f"sampler=dataset takes every candidate of an example, but the examples hold {sorted(sizes)} "
                         "candidates: choose a pool sampler (sampler=cd, random, hardest or reward)")
    return sampler.columns(sizes.pop())


def _epoch_loader(lengths: list[int], cfg: DictConfig, seed: int, epoch: int, processes: int = 1) -> DataLoader:
    """Epoch `e` visits the examples in a permutation fixed by (seed, e): a resumed run can find its place.
    The examples a short last optimiser step (trainer.batch_size on each of the `processes`, trainer.grad_accum
    times) or global batch would hold are dropped, as one process with the same global batch drops them (an
    epoch ends on a whole optimiser step: accelerate steps at the end of an epoch, a partial accumulation included,
    and the run stopped before its last epoch was done); accelerate deals the batches to the processes in turn,
    and would fill a last round of them with repeated examples (counted twice in that step, and the run no longer
    one process's). Fewer examples than one global batch: one short batch (one process), or an equal share for
    each process. With `trainer.group_by_length: G`, each window of G batches of that permutation is sorted by
    length (prompt + longest candidate), cut into batches, and the batches shuffled inside the window: rows of a
    batch have similar lengths (less padding), the order is still fixed by (seed, e).
    Batches are tensors of example indices; the loop builds the rows (which may depend on the policy)."""
    size, generator = cfg.batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    step = size * processes * (cfg.get("grad_accum") or 1)  # an optimiser step's examples
    if len(order) >= step:  # (a short last step: accelerate stepped at the epoch's end on a scaled-down gradient)
        order = order[: len(order) - len(order) % step]
    elif len(order) >= size * processes:
        order = order[: len(order) - len(order) % (size * processes)]
    elif processes > 1:  # (none left when there are fewer examples than processes: train() says so)
        size = max(1, len(order) // processes)
        order = order[: len(order) - len(order) % processes]
    window = (cfg.get("group_by_length") or 0) * size
    if window > size:
        kept, order = order, []
        for start in range(0, len(kept), window):
            by_length = sorted(kept[start : start + window], key=lengths.__getitem__)
            batches = [by_length[i : i + size] for i in range(0, len(by_length), size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                order += batches[b]
    return DataLoader(range(len(lengths)), batch_size=size, sampler=order, collate_fn=torch.tensor)


def disable_dropout(model) -> None:
    """Dropout off in the policy, as TRL's DPOTrainer does by default: reference log-probs and pool scores are
    computed without it, so with it the policy/reference log-ratio would not start at 0 and every step would
    carry its noise. Dropout modules and the float `attention_dropout` many attention layers read from their
    config; LoRA's own dropout (model.lora.dropout) is left as configured."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _packs(model) -> bool:
    if use_packed_attention(model):
        return True
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation != "sdpa":  # sdpa: check_packing refused packed rows on this model and said why
        log.warning("trainer.padding_free=true: %s uses attention %r, which cannot run packed rows exactly; "
                    "training on padded batches", type(model).__name__, implementation)
    return False


class PoolDraws:
    """The negatives of each micro-batch of pools: score every candidate with the current policy (a batched
    no-grad forward, reused while younger than `sampler.refresh_every` steps), then let the sampler draw.
    Column 0 of each example is its chosen y_w. Each example's draws come from a generator seeded by (seed,
    optimiser step, example index), so a resumed run draws what an uninterrupted one would (the kept scores,
    `refresh_every` other than 1, are in the checkpoint: `state`), and a run on N processes what one process
    draws at the same global batch (the kept scores are every process's)."""

    def __init__(self, sampler, examples: list[Example], *, beta: float, pad_id: int, seed: int, batch_size: int):
        self.sampler, self.examples, self.beta, self.pad_id, self.seed = sampler, examples, beta, pad_id, seed
        self.batch_size = batch_size
        width = max(len(ex.completion_ids) for ex in examples)
        self.reference = torch.zeros(len(examples), width)
        self.lengths = torch.zeros(len(examples), width, dtype=torch.long)
        self.judge = torch.full((len(examples), width), float("-inf"))
        for i, ex in enumerate(examples):
            k = len(ex.completion_ids)
            self.reference[i, :k] = torch.tensor(ex.reference_logps)
            self.lengths[i, :k] = torch.tensor([max(1, len(c)) for c in ex.completion_ids])
            # Pairs used as pools of two: the chosen one scores 1, the rejected one 0.
            self.judge[i, :k] = torch.tensor(ex.scores if ex.scores is not None else [1.0, 0.0])
        self.cache: dict[int, tuple[int, Tensor]] = {}

    def state(self) -> dict | None:
        """The kept scores, for a checkpoint (the same on every process); None when nothing is kept."""
        if not self.cache:
            return None
        kept = sorted(self.cache)
        return {"pool_examples": torch.tensor(kept), "pool_scored_at": torch.tensor([self.cache[i][0] for i in kept]),
                "pool_scores": torch.stack([self.cache[i][1] for i in kept])}

    def restore(self, saved: dict | None) -> None:
        self.cache = {} if not saved or "pool_scores" not in saved else {
            i: (step, row) for i, step, row in zip(saved["pool_examples"].tolist(), saved["pool_scored_at"].tolist(),
                                                   saved["pool_scores"])}

    def __call__(self, model, indices: list[int], state: dict) -> tuple[list[list[int]], dict[str, Tensor]]:
        refresh, step = self.sampler.refresh_every, state["step"]
        stale = [i for i in indices if i not in self.cache or (refresh and step - self.cache[i][0] >= refresh)]
        # Several processes: scores kept for later steps are every process's (an example another process scored is
        # not scored again here: the draws stay one process's), and every process makes as many scoring forwards
        # (fewer stale pools, or smaller ones, were fewer forwards), a token's forward at a time after its own: the
        # forwards of the prepared model are collectives (a sharded policy's gathers; DDP broadcasts the buffers
        # before each forward), and uneven ones hung.
        several = distributed.world_size() > 1
        forwards = -(-sum(len(self.examples[i].completion_ids) for i in stale) // self.batch_size)
        idle = max(distributed.gather(forwards)) - forwards if several else 0
        scored, width = {}, self.reference.shape[1]
        if stale:
            logps, _ = candidate_logps(model, [self.examples[i] for i in stale], self.pad_id, batch_size=self.batch_size)
            scored = {i: torch.nn.functional.pad(row, (0, width - row.shape[0])) for i, row in zip(stale, logps)}
        for _ in range(idle):
            idle_forward(model, self.pad_id)
        if several and refresh != 1:
            for part in distributed.gather(scored):
                scored = {**part, **scored}
        for i, row in scored.items():
            self.cache[i] = (step, row)
        index = torch.tensor(indices)
        policy = torch.stack([self.cache[i][1] for i in indices])
        if refresh == 1:
            self.cache.clear()  # scored every visit: nothing to keep
        reference, lengths, judge = self.reference[index], self.lengths[index], self.judge[index]
        scores = self.sampler.kernel_scores(policy, reference, lengths, self.beta)
        # One generator per example, seeded by (seed, optimiser step, example): the draws do not depend on which
        # process holds the example, nor on how a global batch is cut into micro-batches.
        drawn = torch.cat([self.sampler.draw(scores[j : j + 1], judge[j : j + 1], torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + step) * 10_000_019 + i) % 2**63)) for j, i in enumerate(indices)])
        rewards = (self.beta * (policy - reference)).masked_fill(lengths == 0, float("-inf"))
        metrics = {
            "loss/pool": pool_log_softmax_loss(rewards).mean(),
            "negatives/judge_score": judge.gather(1, drawn).mean(),
            "negatives/rank": rank_under(scores, drawn).float().mean(),
            "sampler/ess": effective_sample_size(scores, self.sampler.temperature_for_ess).mean(),
            "sampler/draws_chosen": (drawn == 0).float().mean(),
        }
        columns = torch.cat([torch.zeros(len(indices), 1, dtype=torch.long), drawn], dim=1)
        return columns.tolist(), metrics


def _step_metrics(loss, policy_logps, rewards, batch, beta, pool_metrics: dict) -> dict[str, Tensor]:
    """One micro-batch's metrics. `loss` is the whole-pool log-softmax when the pool was scored (comparable
    across samplers and loss forms), else the optimised loss; `loss/optimised` is always the latter."""
    log_gamma = log_reference_noise(batch["reference_logps"], beta)
    hardest_negative = rewards[:, 1:].max(dim=1).values
    metrics = {
        "loss": pool_metrics.get("loss/pool", loss.detach()),
        "loss/optimised": loss.detach(),
        "rewards/chosen": rewards[:, 0].mean(),
        "rewards/rejected": rewards[:, 1:].mean(),
        "rewards/margin": (rewards[:, 0] - hardest_negative).mean(),
        "rewards/accuracy": (rewards[:, 0] > hardest_negative).float().mean(),
        "logps/chosen": policy_logps[:, 0].mean(),
        "logps/rejected": policy_logps[:, 1:].mean(),
        "log_gamma/mean": log_gamma.mean(),
        "log_gamma/frac_positive": (log_gamma > 0).float().mean(),
        "sequences/with_grad": torch.tensor(float(len(batch["sequence_lengths"]))),
    }
    metrics.update({k: v for k, v in pool_metrics.items() if k != "loss/pool"})
    return metrics


class _Window:
    """Running sums of the metrics between two logged steps, kept as one tensor (no per-step syncs)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: Tensor | None = None
        self.grad_norms: list[Tensor] = []
        self.count, self.tokens, self.start = 0, 0, time.perf_counter()

    def add(self, metrics: dict[str, Tensor], tokens: int, grad_norm, device) -> None:
        if self.sums is None:
            self.names = list(metrics)  # a restored window keeps the checkpoint's order
        values = torch.stack([metrics[name].detach().to(device, torch.float32) for name in self.names])
        self.sums = values if self.sums is None else self.sums + values
        if grad_norm is not None:
            self.grad_norms.append(grad_norm.detach().float() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm))
        self.count += 1
        self.tokens += tokens

    def state(self) -> dict:
        """What a checkpoint keeps of a partly filled window (timing restarts on resume)."""
        sums = dict(zip(self.names, self.sums.tolist())) if self.sums is not None else {}
        return {"sums": sums, "count": self.count,
                "grad_norms": [float(g) for g in self.grad_norms], "tokens": int(self.tokens)}

    def restore(self, saved: dict, device, scale: float = 1.0) -> None:
        """`scale`: this run's micro-batches per checkpoint micro-batch (each optimiser step weighs the same)."""
        if saved["sums"]:
            self.names = list(saved["sums"])
            self.sums = torch.tensor(list(saved["sums"].values()), device=device) * scale
        self.count, self.tokens = saved["count"] * scale, saved["tokens"]
        self.grad_norms = [torch.tensor(g) for g in saved["grad_norms"]]

    def flush(self, accelerator: Accelerator) -> dict:
        means = accelerator.reduce(self.sums / self.count, "mean").tolist()
        out = dict(zip(self.names, means))
        if self.grad_norms:
            out["grad_norm"] = accelerator.reduce(torch.stack(self.grad_norms).mean().to(accelerator.device), "mean").item()
        tokens = accelerator.reduce(torch.as_tensor(self.tokens, device=accelerator.device).float(), "sum").item()
        out["tokens_per_s"] = tokens / (time.perf_counter() - self.start)
        self.__init__()
        return out
