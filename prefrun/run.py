"""The pipeline of `prefrun train`, top to bottom:

load task and policy -> preference data (+ held-out pairs) -> reference log-probs (cached) ->
judged eval before -> train -> judged eval after, held-out pair metrics -> save checkpoint and summary.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from prefrun.checkpoint import Checkpoints
from prefrun.data import attach_reference_logps
from prefrun.evaluate import judged_scores, preference_metrics
from prefrun.model import fingerprint, load_policy, load_reference, save_policy
from prefrun.runlog import RunLog
from prefrun.train import make_accelerator, train

log = logging.getLogger("prefrun")


def run(cfg: DictConfig) -> float | None:
    """Run one job; return what sweepers optimise: the held-out judged score after training, or the
    held-out pairs' reward accuracy when there is no judged task."""
    accelerator = make_accelerator(cfg.trainer)
    hydra_cfg = HydraConfig.get()
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode.name == "MULTIRUN" else None
    record = RunLog(Path(hydra_cfg.runtime.output_dir), cfg, enabled=accelerator.is_main_process, sweep_name=sweep)
    cache_dir = Path(cfg.cache_dir).expanduser()
    set_seed(cfg.seed)
    log.info("accelerate: %d process(es), %s, mixed precision %s", accelerator.num_processes, accelerator.device,
             accelerator.mixed_precision)

    task = instantiate(cfg.task) if cfg.get("task") else None  # `~task`: no built-in task
    data = instantiate(cfg.data)
    data.check()
    policy, tokenizer, name_or_path = load_policy(cfg.model, task, cache_dir)
    policy.to(accelerator.device)
    examples = data.load(policy=policy, tokenizer=tokenizer, task=task, cache_dir=cache_dir)
    held_out = data.load_eval(policy=policy, tokenizer=tokenizer, task=task, cache_dir=cache_dir)
    _attach_reference(cfg, accelerator, policy, tokenizer, [examples, held_out], cache_dir)

    judge = (lambda: judged_scores(policy, tokenizer, task, cfg.eval, cfg.seed)) if task and cfg.eval.num_prompts \
        else dict
    before = judge()
    loss_fn = instantiate(cfg.loss)
    last = train(policy, tokenizer, examples, loss_fn=loss_fn, beta=cfg.loss.beta, sampler=instantiate(cfg.sampler),
                 optimizer_factory=instantiate(cfg.optim), cfg=cfg.trainer, accelerator=accelerator, seed=cfg.seed,
                 on_log=record.metrics, on_resume=record.truncate_metrics,
                 checkpoints=Checkpoints(record.dir / "checkpoints", cfg.trainer.save_every, cfg.trainer.keep_last))
    policy = accelerator.unwrap_model(policy)
    after = judge()
    pairs_after = preference_metrics(policy, tokenizer, held_out, loss_fn=loss_fn,
                                     batch_size=_scoring_batch(cfg)) if held_out else {}

    _save_final(cfg, accelerator, policy, tokenizer, record.dir)
    if accelerator.is_main_process:
        summary = record.summary({"model": name_or_path, "num_examples": len(examples), "skipped": data.skipped,
                                  "final": last, "eval_before": before, "eval_after": after,
                                  "held_out_pairs_after": pairs_after})
        _report(summary, cfg.eval.get("primary"), record.dir)
    primary = cfg.eval.get("primary")
    return after[primary]["mean"] if primary in after else pairs_after.get("rewards/accuracy")


def _attach_reference(cfg, accelerator, policy, tokenizer, parts, cache_dir: Path) -> None:
    """The reference is the policy's starting weights (with LoRA: the base, adapters being zero at
    start) unless model.reference names another model. Its log-probs are computed (or loaded from
    the cache) before training, so no second model is held in memory while training."""
    reference = load_reference(cfg.model)
    if reference is not None:
        reference.to(accelerator.device)
    reference = reference or policy
    weights_key = fingerprint(reference)
    for examples in parts:
        if examples:
            attach_reference_logps(examples, reference, tokenizer, cache_dir=cache_dir,
                                   batch_size=_scoring_batch(cfg), weights_key=weights_key)


def _scoring_batch(cfg) -> int:
    """Prompts per no-grad forward; by default the training micro-batch, which is known to fit."""
    return cfg.trainer.reference_batch_size or cfg.trainer.batch_size


def _save_final(cfg, accelerator, policy, tokenizer, run_dir: Path) -> None:
    if not cfg.trainer.save_final:
        return
    lora = cfg.model.get("lora")
    # Every process takes part: under FSDP or DeepSpeed ZeRO-3 this gathers the shards.
    state_dict = None if lora else accelerator.get_state_dict(policy)
    if accelerator.is_main_process:
        save_policy(policy, tokenizer, run_dir / "checkpoint-final", merge_lora=bool(lora and lora.merge),
                    state_dict=state_dict)


def _report(summary: dict, primary: str | None, run_dir: Path) -> None:
    for name in summary["eval_before"]:
        b, a = summary["eval_before"][name], summary["eval_after"][name]
        d = a["decoding"]
        how = "greedy" if d["temperature"] == 0 else f"T={d['temperature']}, top_p={d['top_p']}, n={d['num_samples']}"
        log.info("judged score [%s%s] (%d held-out prompts, %s): before %.3f ± %.3f -> after %.3f ± %.3f",
                 name, ", primary" if name == primary else "", b["num_prompts"], how, b["mean"], b["stderr"],
                 a["mean"], a["stderr"])
    pairs = summary["held_out_pairs_after"]
    if pairs:
        log.info("held-out pairs (%d): loss %.4f, reward accuracy %.3f, margin %.3f", pairs["num_pairs"],
                 pairs["loss"], pairs["rewards/accuracy"], pairs["rewards/margin"])
    log.info("run directory: %s (%.0f s)", run_dir, summary["wall_time_s"])
