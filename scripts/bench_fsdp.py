"""Sharded against replicated training on two CPU processes: peak memory per process, step time and checkpoint
size of DPO on one process, on two with DDP, and on two with FSDP2 (the shipped FSDP config with
`trainer.cpu_fsdp=true`), at the same global batch, in one run.

Builds a Llama (default ~75M parameters, fp32) and a synthetic pair file (as bench_memory.py does), then runs
`prefrun train` as a user would: `python -m prefrun` for one process, `accelerate launch --config_file
docs/accelerate/fsdp.yaml --num_processes 2` for the others (without `trainer.cpu_fsdp` accelerate trains
that config as DDP on CPUs). Each run saves one resumable checkpoint, so the table also shows what each
process writes. The final losses must agree (printed): the three runs train the same model on the same data.

    python scripts/bench_fsdp.py [--hidden 768 --layers 8 --steps 6 --batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_memory import build  # scripts/ is on sys.path when this file runs

REPO = Path(__file__).resolve().parents[1]


def launcher(processes: int, workdir: Path) -> tuple[list[str], dict]:
    """The command prefix and environment of `prefrun` on `processes` processes: `python -m prefrun`, or
    `accelerate launch` with the shipped FSDP config (DDP on CPUs unless trainer.cpu_fsdp=true)."""
    if processes == 1:
        prefix = [sys.executable, "-m", "prefrun"]
    else:
        config = workdir / "fsdp.yaml"
        shutil.copy(REPO / "docs" / "accelerate" / "fsdp.yaml", config)
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                  "--num_processes", str(processes), "-m", "prefrun"]
    # glibc's heap keeps freed memory unless told otherwise (see bench_memory.py); each process gets an equal
    # share of the cores.
    env = {**os.environ, "PREFRUN_CACHE": str(workdir / "cache"), "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    return prefix, env


def run(name: str, processes: int, workdir: Path, model_dir: Path, data: Path, args, extra: list[str]) -> dict:
    run_dir = workdir / name
    overrides = ["model=hf", f"model.name_or_path={model_dir}", "model.dtype=float32", "data=jsonl",
                 f"data.path={data}", "~task", f"trainer.batch_size={args.batch // processes}",
                 f"trainer.max_steps={args.steps}", f"trainer.save_every={args.steps // 2}", "trainer.log_every=1",
                 "trainer.save_final=false", f"hydra.run.dir={run_dir}", *extra]
    prefix, env = launcher(processes, workdir)
    subprocess.run([*prefix, "train", *overrides], check=True, capture_output=True, env=env, cwd=workdir)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checkpoint = run_dir / "checkpoints" / f"step-{args.steps // 2}"
    files = [f for f in checkpoint.rglob("*") if f.is_file()]
    per_process = {}  # what each process wrote: DCP shards are named __<rank>_0.distcp; the rest is rank 0's
    for f in files:
        rank = int(f.name[2:].split("_")[0]) if f.name.startswith("__") and f.suffix == ".distcp" else 0
        per_process[rank] = per_process.get(rank, 0) + f.stat().st_size
    return {"peak_rss_mb": summary["peak_memory_mb"]["cpu_rss"], "wall_s": summary["wall_time_s"],
            "tokens_per_s": sorted(r["tokens_per_s"] for r in rows[1:])[len(rows[1:]) // 2],
            "checkpoint_mb": sum(per_process.values()) / 2**20,
            "largest_writer_mb": max(per_process.values()) / 2**20,
            "final_loss": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global batch (pairs per optimiser step)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefrun_fsdp_") as tmp:
        workdir = Path(tmp)
        model_dir, data = build(workdir, args)
        params = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 4
        results = {"1 process": run("one", 1, workdir, model_dir, data, args, []),
                   "2 processes, DDP": run("ddp", 2, workdir, model_dir, data, args, []),
                   "2 processes, FSDP2": run("fsdp", 2, workdir, model_dir, data, args, ["trainer.cpu_fsdp=true"])}
    print(f"model: Llama {params / 1e6:.0f}M parameters, fp32 ({params * 4 / 2**20:.0f} MB per copy of the weights); "
          f"global batch {args.batch} pairs, {args.steps} steps, AdamW, CPU (gloo)")
    ddp = results["2 processes, DDP"]
    print(f"{'run':<20}{'peak RSS MB':>13}{'/ DDP':>7}{'tokens/s':>10}{'/ DDP':>7}{'checkpoint MB':>15}"
          f"{'largest writer MB':>19}{'final loss':>12}")
    for name, r in results.items():
        print(f"{name:<20}{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] / ddp['peak_rss_mb']:>7.2f}"
              f"{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / ddp['tokens_per_s']:>7.2f}{r['checkpoint_mb']:>15.0f}"
              f"{r['largest_writer_mb']:>19.0f}{r['final_loss']:>12.6f}")
    print("peak RSS: the main process's (every process holds the same share); tokens/s: the median step's, all "
          "processes together")


if __name__ == "__main__":
    main()
