"""Host memory of online rounds (APO, 3 rounds) per process: one process, two with DDP, two with FSDP2 (the
shipped FSDP config with `trainer.cpu_fsdp=true`), at the same global batch, in one run. Every process of
each run is polled (its resident memory, every 50 ms), so the table shows the largest process and the others
apart: with FSDP2 a process keeps only its shard of the policy, of the round's weights θ̂_t and θ̂_{t-1} (APO's
extrapolation runs shard by shard) and of the starting weights (the KL estimate), while the main process also
gathers the whole to write each round's weights. The round's losses must agree (printed).

The embedded recipe scaled up (default hidden 768, 8 layers: ~60M parameters, fp32), warmed up on the task so
that its samples differ in score, HF generation (the engine's memory is another matter).

    python scripts/bench_online_memory.py [--hidden 768 --layers 8 --steps 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
from bench_fsdp import launcher  # scripts/ is on sys.path when this file runs


class TreeMemory:
    """The peak resident memory of every process started under `pid`, polled while the block runs."""

    def __init__(self, pid: int) -> None:
        self.root, self.peaks, self.names, self.running = psutil.Process(pid), {}, {}, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in processes:
                try:
                    rss, command = proc.memory_info().rss, " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if "prefrun" in command and "accelerate" not in command:  # a training process, not the launcher
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            time.sleep(0.05)

    def stop(self) -> list[int]:
        self.running = False
        self.thread.join()
        return sorted(self.peaks.values(), reverse=True)


def run(name: str, processes: int, workdir: Path, args, extra: list[str]) -> dict:
    run_dir = workdir / name
    overrides = ["experiment=apo_tiny", "generator=hf", f"model.build.hidden_size={args.hidden}",
                 f"model.build.num_heads={args.hidden // 64}", f"model.build.num_layers={args.layers}",
                 f"model.build.intermediate_size={4 * args.hidden}", "model.build.sft_steps=20",
                 "generator.num_candidates=4", "generator.max_new_tokens=12", "online.rounds=3",
                 "online.prompts_per_round=32", "data.num_prompts=96", "eval.num_prompts=8",
                 f"trainer.batch_size={args.batch // processes}", f"trainer.max_steps={args.steps}", "trainer.epochs=1",
                 "trainer.log_every=1", "trainer.save_every=0", "trainer.save_final=false", f"hydra.run.dir={run_dir}",
                 *extra]
    prefix, env = launcher(processes, workdir)
    proc = subprocess.Popen([*prefix, "train", *overrides], env=env, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    _, err = proc.communicate()
    peaks = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"peaks_mb": [p / 2**20 for p in peaks], "losses": [r["loss"] for r in rows if "loss" in r],
            "wall_s": json.loads((run_dir / "summary.json").read_text())["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per round")
    parser.add_argument("--batch", type=int, default=8, help="global batch (pairs per optimiser step)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefrun_online_memory_") as tmp:
        workdir = Path(tmp)
        run("warm", 1, workdir, args, ["online.rounds=1", "trainer.max_steps=1"])  # builds the model into the cache
        results = {"1 process": run("one", 1, workdir, args, []),
                   "2 processes, DDP": run("ddp", 2, workdir, args, []),
                   "2 processes, FSDP2": run("fsdp", 2, workdir, args, ["trainer.cpu_fsdp=true"])}
    print(f"APO, 3 rounds x 32 prompts x 4 candidates (HF), embedded recipe hidden {args.hidden}, {args.layers} layers, "
          f"fp32, global batch {args.batch}, {args.steps} steps a round, CPU (gloo)\n")
    ddp = results["2 processes, DDP"]["peaks_mb"]
    print("| run | peak RSS, largest process MB | / DDP | other process MB | / DDP | wall s | losses equal to 1 process |")
    print("|---|---|---|---|---|---|---|")
    one = results["1 process"]["losses"]
    for name, r in results.items():
        peaks = r["peaks_mb"]
        other = f"{peaks[1]:.0f} | {peaks[1] / ddp[1]:.2f}" if len(peaks) > 1 else "- | -"
        same = len(r["losses"]) == len(one) and all(abs(a - b) < 1e-4 for a, b in zip(r["losses"], one))
        print(f"| {name} | {peaks[0]:.0f} | {peaks[0] / ddp[0]:.2f} | {other} | {r['wall_s']:.0f} | {same} |")


if __name__ == "__main__":
    main()
