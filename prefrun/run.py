"""The pipeline of `prefrun train`, top to bottom:

load task and policy -> preference data -> reference log-probs (cached) -> judged eval before
-> train -> judged eval after -> save checkpoint and summary.
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
from prefrun.evaluate import judged_scores
from prefrun.model import fingerprint, load_policy, load_reference, save_policy
from prefrun.runlog import RunLog
from prefrun.train import make_accelerator, train

log = logging.getLogger("prefrun")


def run(cfg: DictConfig) -> float | None:
    """Run one job; return the held-out judged score after training (what sweepers optimise)."""
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
    # The reference is the policy's starting weights (with LoRA: the base, adapters being zero at
    # start) unless model.reference names another model. Its log-probs are computed (or loaded from
    # the cache) before training, so no second model is held in memory while training.
    reference = load_reference(cfg.model)
    if reference is not None:
        reference.to(accelerator.device)
    reference = reference or policy
    attach_reference_logps(examples, reference, tokenizer, cache_dir=cache_dir,
                           batch_size=cfg.trainer.reference_batch_size, weights_key=fingerprint(reference))
    del reference

    before = judged_scores(policy, tokenizer, task, cfg.eval, cfg.seed) if task and cfg.eval.num_prompts else {}
    last = train(policy, tokenizer, examples, loss_fn=instantiate(cfg.loss), beta=cfg.loss.beta,
                 sampler=instantiate(cfg.sampler),
                 optimizer_factory=instantiate(cfg.optim), cfg=cfg.trainer, accelerator=accelerator, seed=cfg.seed,
                 on_log=record.metrics, on_resume=record.truncate_metrics,
                 checkpoints=Checkpoints(record.dir / "checkpoints", cfg.trainer.save_every, cfg.trainer.keep_last))
    policy = accelerator.unwrap_model(policy)
    after = judged_scores(policy, tokenizer, task, cfg.eval, cfg.seed) if task and cfg.eval.num_prompts else {}

    lora = cfg.model.get("lora")
    # Every process takes part: under FSDP or DeepSpeed ZeRO-3 this gathers the shards.
    state_dict = accelerator.get_state_dict(policy) if cfg.trainer.save_final and not lora else None
    if accelerator.is_main_process:
        if cfg.trainer.save_final:
            save_policy(policy, tokenizer, record.dir / "checkpoint-final", merge_lora=bool(lora and lora.merge),
                        state_dict=state_dict)
        summary = record.summary({"model": name_or_path, "num_examples": len(examples), "final": last,
                                  "eval_before": before, "eval_after": after})
        _report(summary, cfg.eval.get("primary"), record.dir)
    primary = cfg.eval.get("primary")
    return after[primary]["mean"] if primary in after else None


def _report(summary: dict, primary: str | None, run_dir: Path) -> None:
    for name in summary["eval_before"]:
        b, a = summary["eval_before"][name], summary["eval_after"][name]
        d = a["decoding"]
        how = "greedy" if d["temperature"] == 0 else f"T={d['temperature']}, top_p={d['top_p']}, n={d['num_samples']}"
        log.info("judged score [%s%s] (%d held-out prompts, %s): before %.3f ± %.3f -> after %.3f ± %.3f",
                 name, ", primary" if name == primary else "", b["num_prompts"], how, b["mean"], b["stderr"],
                 a["mean"], a["stderr"])
    log.info("run directory: %s (%.0f s)", run_dir, summary["wall_time_s"])
