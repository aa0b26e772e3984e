"""`prefrun <command> [hydra overrides]`. Every command is a Hydra app over the tree in conf/."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

_RUN_DIRS: dict[tuple, str] = {}  # Hydra resolves hydra.sweep.dir again for every job of a grid


def run_dir(resume: str | None, fresh: str) -> str:
    key = (resume, fresh)
    if key not in _RUN_DIRS:
        _RUN_DIRS[key] = _agreed_run_dir(resume, fresh)
    return _RUN_DIRS[key]


def _agreed_run_dir(resume: str | None, fresh: str) -> str:
    """`hydra.run.dir`: the directory being resumed, if any, else a fresh timestamped one, the same
    for every process of an `accelerate launch` job (rank 0 picks it; the others read it from a
    file keyed by the job's rendezvous port; a job on several machines must name it: hydra.run.dir=...)."""
    if resume:
        return resume
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return fresh
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) != world:  # several machines: no common temporary directory
        sys.exit(f"prefrun: this job spans several machines ({world} processes, "
                 f"{os.environ.get('LOCAL_WORLD_SIZE')} here): give every machine the same run directory on a "
                 "shared filesystem, hydra.run.dir=<path> (or resume=<path>; a grid, -m: hydra.sweep.dir=<path>)")
    note = Path(tempfile.gettempdir()) / f"prefrun-run-dir-{os.environ.get('MASTER_PORT', '0')}"
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = note.with_suffix(".tmp")
        tmp.write_text(str(Path(fresh).resolve()))
        os.replace(tmp, note)
        return fresh
    deadline = time.time() + 120
    while time.time() < deadline:
        # A note older than a minute belongs to an earlier job that used the same port.
        if note.exists() and time.time() - note.stat().st_mtime < 60:
            return note.read_text()
        time.sleep(0.1)
    raise RuntimeError(f"rank {os.environ.get('RANK')}: rank 0 never announced its run directory in {note}")


OmegaConf.register_new_resolver("prefrun.run_dir", run_dir, replace=True)


def config_dir() -> str:
    """conf/ ships inside a built wheel as prefrun/conf; an editable install finds it beside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"prefrun's config tree (conf/train.yaml) is missing next to {here}; reinstall prefrun")


_held_stderr: list = []
# Hydra's flags that print (the config, help) instead of running
_PRINT_ONLY = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")


def _hold_hydras_errors() -> None:
    """Hydra's own errors (a bad override, a missing config group) come before any process group, and every process
    of a job makes the same one: under several processes only the main one prints them. The others hold their
    stderr until prefrun's own code runs (`_release_stderr`), or drop it when Hydra stops them first."""
    import io

    if int(os.environ.get("RANK", "0")) > 0 and not _held_stderr:
        _held_stderr.append(sys.stderr)
        sys.stderr = io.StringIO()


def _speak_unless_main_did(wait_s: float = 10.0) -> None:
    """Hydra's error on a process that is not the main one: the main process, making the same error, prints it and
    exits, and the launcher then stops this one (torchrun sends SIGTERM) while it waits. Leaving at once instead
    had the launcher stop the main process before it printed anything. When no signal comes, the error was this
    process's alone, and it prints it."""
    time.sleep(wait_s)
    held = sys.stderr.getvalue() if hasattr(sys.stderr, "getvalue") else ""
    _release_stderr()
    sys.stderr.write(held)


def _release_stderr() -> None:
    if _held_stderr:
        sys.stderr = _held_stderr.pop()


def _one_line_errors(pipeline: str, cfg: DictConfig):
    """Run `prefrun.<module>.<function>` (`pipeline`); a PrefrunError or an unset mandatory key ends the run
    with one line (also in the run directory's log) and exit status 2; so does a collective whose peer is gone,
    with exit status 1."""
    import importlib

    from hydra.errors import InstantiationException

    from prefrun import preemption
    from prefrun.errors import PrefrunError

    _release_stderr()
    module, function = pipeline.rsplit(".", 1)
    try:  # heavy imports after Hydra has parsed the command line (fast --help)
        preemption.listen(cfg.get("stop_signals"))
        _check_value_types(cfg)
        return getattr(importlib.import_module(module), function)(cfg)
    except preemption.Preempted as err:
        logging.getLogger("prefrun").warning("%s; %s", err, _how_to_continue(cfg))
        preemption.hand_over(err)  # inside a submitit job: its handler requeues the job
        sys.exit(preemption.EXIT_CODE)
    except (PrefrunError, InstantiationException) as err:
        # A component that refuses its settings in its constructor reaches us wrapped by Hydra.
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if not isinstance(cause, PrefrunError):
            raise
        _stop_with(str(cause), printed_by_main=getattr(cause, "printed_by_main", False))
    except OSError as err:  # a full disk where no part of prefrun expected one (W&B, a library's own files)
        from prefrun.storage import disk_full, is_full

        if not is_full(err):
            raise
        _stop_with(str(disk_full(Path(err.filename or os.getcwd()), None, err)))
    except MemoryError as err:  # torch.OutOfMemoryError is not one: below
        _stop_with(_out_of_memory(err, cfg), code=1)
    except MissingMandatoryValue as err:
        _stop_with(f"{err.full_key} is not set: give it on the command line ({err.full_key}=...)")
    except RuntimeError as err:  # a collective whose peer died: the launcher is about to signal this process too
        from prefrun import distributed

        if _is_out_of_memory(err):
            _stop_with(_out_of_memory(err, cfg), code=1)

        line = distributed.peer_lost(err)
        if line is None:
            raise
        preemption.ignore()
        stopped = distributed.stopped_peer()
        if stopped is not None:  # it printed why: only the run's log gets its line, from the main process
            other, code, said = stopped
            _into_run_log(f"process {other} of {distributed.world_size()} stopped: {said}")
            sys.exit(code)
        _stop_with(f"{line}; {_how_to_continue(cfg)}", code=1)


# Where a run ran out of memory (the first of these found in the error's traceback: a module, and the functions of
# it, None for any) and what lowers that phase's memory. The first entries run inside the later ones.
_MEMORY_KNOBS = (
    ("prefrun/judges.py", None, "judging", "lower judge.batch_size or judge.max_length"),
    ("prefrun/evaluate.py", None, "evaluating", "lower eval.batch_size (prompts per generate() call) or "
     "eval.max_new_tokens, or trainer.reference_batch_size"),
    ("prefrun/generate/", None, "generating", "lower generator.batch_size (prompts per generate() call, each "
     "generator.num_candidates rows) or generator.max_new_tokens"),
    ("prefrun/pools.py", ("generate_shard", "generate_wave"), "generating", "lower generator.batch_size (prompts "
     "per generate() call, each generator.num_candidates rows) or generator.max_new_tokens"),
    ("prefrun/train.py", ("__call__",), "scoring pools", "lower trainer.reference_batch_size"),
    ("prefrun/train.py", None, "training", "lower trainer.batch_size and raise trainer.grad_accum as much (the same "
     "optimiser steps: the run continues from its last checkpoint), or model.gradient_checkpointing=true, or lower "
     "trainer.logits_budget_mb or data.max_length"),
    ("prefrun/data/reference.py", None, "computing reference log-probs", "lower trainer.reference_batch_size"),
    ("prefrun/model.py", None, "loading the model", "load it in 16 bits (model.dtype=bfloat16), train LoRA "
     "adapters (+model/lora=default), or shard it (accelerate launch --config_file docs/accelerate/fsdp.yaml)"),
)


def _out_of_memory(err: BaseException, cfg: DictConfig) -> str:
    """One line for a run out of memory (a GPU's, or an allocation the CPU refused): the phase it was in, what
    lowers that phase's memory, the start of torch's own message (what it tried to allocate, what was free)."""
    frames = [(f.f_code.co_filename.replace(os.sep, "/"), f.f_code.co_name) for f, _ in traceback.walk_tb(err.__traceback__)]
    phase, knobs = "", "lower the batch sizes (trainer.batch_size, generator.batch_size, eval.batch_size)"
    for where, functions, name, fix in _MEMORY_KNOBS:
        if any(where in file and (functions is None or code in functions) for file, code in frames):
            phase, knobs = f" {name}", fix
            break
    if OmegaConf.select(cfg, "generator._target_", default="").endswith("VLLMGenerator") and \
            OmegaConf.select(cfg, "generator.kv_cache_memory_bytes") is None:
        knobs += (f"; the vLLM engine may take generator.gpu_memory_utilization="
                  f"{OmegaConf.select(cfg, 'generator.gpu_memory_utilization')} of the GPU")
    said = str(err).strip()
    said = said[said.index("DefaultCPUAllocator"):].split(". Error code")[0] if "DefaultCPUAllocator" in said else \
        ". ".join(said.split(". ")[:3]).rstrip(".") or type(err).__name__
    return (f"out of memory{phase} ({said}): {knobs}; `plan=true` prints each phase's memory per device; what was "
            "finished is kept")


def _is_out_of_memory(err: RuntimeError) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS, XPU), or the CPU allocator's refusal (a plain RuntimeError)."""
    return type(err).__name__ == "OutOfMemoryError" or "DefaultCPUAllocator: can't allocate memory" in str(err)


# Counts whose 0 has no meaning, where a config holds them (train's, eval's, generate's).
_AT_LEAST_ONE = ("trainer.batch_size", "trainer.grad_accum", "trainer.log_every", "eval.batch_size",
                 "eval.interval_resamples", "interval_resamples", "judge_shard_size", "generator.num_candidates",
                 "generator.batch_size")


def _check_value_types(cfg: DictConfig) -> None:
    """A value given on the command line where the config holds a number or a true/false (`trainer.max_steps=abc`)
    stops the run here, in one line, rather than deep inside the run minutes later. The defaults are the config
    composed with the command's group choices alone."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from prefrun.errors import InputError

    for key in _AT_LEAST_ONE:  # a 0 here failed deep inside (a division by zero, numpy's bootstrap), after training
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise InputError(f"{key}={value}: give a whole number >= 1")
    hydra_cfg = HydraConfig.get()
    given = [o for o in hydra_cfg.overrides.task if "=" in o and not o.startswith(("+", "~"))]
    values = [o for o in given if "." in o.split("=", 1)[0]]
    if not values:
        return
    try:
        base = compose(hydra_cfg.job.config_name, overrides=[o for o in given if o not in values])
    except Exception:  # noqa: BLE001 - the defaults cannot be composed apart (a sweep's own syntax): no check
        return
    for override in values:
        key = override.split("=", 1)[0]
        default = OmegaConf.select(base, key, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if not isinstance(value, str) or default is None or isinstance(default, str):
            continue
        if isinstance(default, bool):
            raise InputError(f"{key}={value!r}: give true or false")
        if isinstance(default, (int, float)):
            raise InputError(f"{key}={value!r}: give a number (the default is {default})")


def _stop_with(line: str, code: int = 2, *, printed_by_main: bool = False) -> None:
    """The run ends with `line` (also in the run directory's log) and exit status `code`, printed once under
    several processes when they all stop with it; left for the others to find when it is this process's alone
    (`distributed.stopped_peer`). `printed_by_main`: every process stops with it, the main process prints it."""
    from prefrun import distributed

    if not distributed.said_by_main(line, code, known=printed_by_main):
        logging.getLogger("prefrun").error("%s", line)
    sys.exit(code)


def _into_run_log(line: str) -> None:
    """`line` into the run directory's log alone (the main process's file handler), not onto the console."""
    logger = logging.getLogger("prefrun")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _how_to_continue(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode.name == "MULTIRUN":
        return (f"the same command with hydra.sweep.dir={hydra_cfg.sweep.dir} continues every job of the grid from "
                "its own checkpoints")
    if "output" in cfg and "trainer" not in cfg:  # prefrun generate: the output's shards are its checkpoint
        return "the same command continues from the finished shards"
    if "judgments_dir" in cfg:  # prefrun eval: the answers' shards in the run directory, verdicts in the cache
        named = any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
        return ("the same command continues from the finished shards" if named else
                f"the same command with hydra.run.dir={hydra_cfg.runtime.output_dir} continues from the finished shards")
    named = cfg.get("resume") or any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
    return ("the same command continues" if named else
            f"the same command with resume={hydra_cfg.runtime.output_dir} continues")


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    return _one_line_errors("prefrun.run.run", cfg)


@hydra.main(config_path=config_dir(), config_name="generate", version_base="1.3")
def generate(cfg: DictConfig) -> None:
    _one_line_errors("prefrun.run.generate_pools", cfg)


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    _one_line_errors("prefrun.compare.run", cfg)


@hydra.main(config_path=config_dir(), config_name="testbed", version_base="1.3")
def testbed(cfg: DictConfig) -> None:
    _one_line_errors("prefrun.testbed.run", cfg)


def report() -> None:
    from prefrun.errors import PrefrunError
    from prefrun.report import main as report_main

    try:
        report_main(sys.argv[1:])
    except PrefrunError as err:
        sys.exit(f"prefrun report: {err}")


COMMANDS = {"train": (train, "preference optimisation: DPO, IPO, MC-PO (pools); online rounds: iterative DPO, OnMC-PO, APO"),
            "generate": (generate, "candidate pools: prompts -> K completions (vLLM or HF) -> judge scores -> jsonl/parquet"),
            "eval": (evaluate, "a model against a baseline: pairwise win rate, 95% interval, length-controlled win rate"),
            "testbed": (testbed, "exact checks of DPO, MC-PO, APO on a finite bandit; writes docs/testbed.md"),
            "report": (report, "tables and plots of a run or multirun directory: prefrun report <dir>")}

_HYDRA_COMMANDS = ("train", "generate", "eval", "testbed")  # (report parses its own arguments)
_ONE_PROCESS_COMMANDS = ("testbed", "report")  # under several processes, run by the main process only

USAGE = """usage: prefrun <command> [overrides ...] [hydra flags]

commands:
{commands}

Examples:
  prefrun train                                   # the embedded default job (tiny model, sort task, DPO)
  prefrun train --help                            # config groups and options
  prefrun train --cfg job                         # print the composed config
  prefrun train loss=ipo loss.beta=0.5            # override any key
  prefrun train -m loss.beta=0.05,0.1 optim.lr=1e-4,3e-4   # a multirun grid
  prefrun train model.name_or_path=<hub id|dir> data=jsonl data.path=pairs.jsonl ~task
  prefrun train experiment=mcpo_tiny              # MC-PO with CD negatives on the embedded task
  prefrun generate model=hf model.name_or_path=<dir> prompts.path=prompts.jsonl judge=reward_model \
      judge.name_or_path=<reward model> output=pools.jsonl
  prefrun train loss=mcpo_cd sampler=cd data=pools data.path=pools.jsonl model=hf model.name_or_path=<dir> ~task
  prefrun eval policy=<run dir>                   # win rate of a trained run against its starting model
  prefrun testbed                                 # exact checks on a finite bandit -> docs/testbed.md
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands="\n".join(f"  {n:<10}{d}" for n, (_, d) in COMMANDS.items())))
        return
    if argv[0] not in COMMANDS:
        sys.exit(f"prefrun: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
    command, _ = COMMANDS[argv[0]]
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from prefrun.distributed import env_from_job, finish

    env_from_job()  # `srun` tasks as ranks, before Hydra picks the run directory (the same one for all of them)
    sys.argv = [f"prefrun {argv[0]}", *argv[1:]]
    if int(os.environ.get("RANK", "0")) > 0:
        if any(a.split("=")[0] in _PRINT_ONLY for a in argv[1:]):
            return  # Hydra prints and runs nothing: the main process prints it once
        if argv[0] in _ONE_PROCESS_COMMANDS:
            return  # small exact work with files of its own: the main process does it, once
        if argv[0] in _HYDRA_COMMANDS and not any(a.split("=")[0].lstrip("+") == "hydra.output_subdir"
                                                  for a in argv[1:]):
            # One writer for <run dir>/.hydra/: the main process (which also puts the live run's back when a
            # command is refused, runlog._hydra_files, and could not if the others wrote after it)
            sys.argv.append("hydra.output_subdir=null")
        if argv[0] in _HYDRA_COMMANDS and not any(a.split("=")[0].lstrip("+") == "hydra/hydra_logging"
                                                  for a in argv[1:]):
            sys.argv.append("hydra/hydra_logging=disabled")  # a sweep's lines ("Launching 4 jobs"), once
    _hold_hydras_errors()
    try:
        command()  # errors leave through sys.exit, without waiting for the other processes
    except SystemExit as stop:
        if _held_stderr and stop.code not in (None, 0):  # Hydra stopped this process before prefrun's code ran
            _speak_unless_main_did()
        raise
    finally:
        _release_stderr()
    finish()


if __name__ == "__main__":
    main()
