"""Online rounds on 1 process against N processes (`accelerate launch`) at the same global batch: the prompts
each process generates (its share must fall to about 1/N), the time per part of a round and the round's wall
time, and the ratios N-process / 1-process, in one run. The same fold, the same seed: the pools must come out
byte-identical (checked and printed).

Runs `prefrun train experiment=iterdpo_tiny generator=hf` as a user would and reads `rounds/<t>/round.json`.
On a CPU the processes share the machine's cores (each gets OMP_NUM_THREADS = cores / N), so the wall time
says how well the split uses them; on GPUs each process has its own device. `--generator vllm` runs the rounds
with a vLLM engine per process, and adds N processes with one engine the main process feeds
(`generator.engines=main`: it generates every shard, the processes judge their own). `--fsdp` runs the N
processes under the shipped FSDP config as real FSDP2 (`trainer.cpu_fsdp=true`): from round 2 on the policy is
sharded and each HF generate() call is a collective the processes make together (synced, idle calls for the
process with fewer), so the split is measured where every forward also gathers each layer. `--zero3` does the
same under the shipped DeepSpeed ZeRO-3 config (`trainer.cpu_deepspeed=true`: DeepSpeed for real).

    python scripts/bench_processes.py
    python scripts/bench_processes.py --processes 2 --rounds 2 --prompts 512 -- trainer.max_steps=10
    python scripts/bench_processes.py --generator vllm -- generator.shard_size=64
    python scripts/bench_processes.py --fsdp --rounds 3
    python scripts/bench_processes.py --zero3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("generate_s", "judge_s", "reference_s", "train_s", "eval_s")
SHARDED_CONFIGS = {"FSDP2": "fsdp.yaml", "DeepSpeed ZeRO-3": "deepspeed_zero3.yaml"}


def run(processes: int, args, out: Path, extra: tuple[str, ...] = (), name: str | None = None) -> dict:
    run_dir = out / (name or f"processes-{processes}{'-'.join(('', *extra)).replace('=', '-')}")
    batch = args.global_batch // processes
    overrides = ["experiment=iterdpo_tiny", f"generator={args.generator}", *extra, f"online.rounds={args.rounds}",
                 f"online.prompts_per_round={args.prompts}", f"data.num_prompts={args.rounds * args.prompts}",
                 "eval.num_prompts=256", "eval.batch_size=64", "trainer.epochs=1", f"trainer.batch_size={batch}",
                 "trainer.save_final=false", f"hydra.run.dir={run_dir}", *args.overrides]
    if processes > 1 and args.sharded:
        overrides.append(f"trainer.cpu_{'fsdp' if args.fsdp else 'deepspeed'}=true")
        config = out / SHARDED_CONFIGS[args.sharded]
        shutil.copy(Path(__file__).resolve().parents[1] / "docs" / "accelerate" / config.name, config)
        how = ["--config_file", str(config)]
    else:
        how = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1"]
    prefix = [sys.executable, "-m", "prefrun"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(processes), "-m", "prefrun"]
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PREFRUN_CACHE": str(out / "cache")}
    start = time.perf_counter()
    subprocess.run([*prefix, "train", *overrides], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    rounds = [json.loads((run_dir / "rounds" / str(t) / "round.json").read_text()) for t in range(1, args.rounds + 1)]
    return {"rounds": rounds, "command_s": time.perf_counter() - start, "dir": run_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=512, help="prompts per round")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--generator", choices=("hf", "vllm"), default="hf")
    sharding = parser.add_mutually_exclusive_group()
    sharding.add_argument("--fsdp", action="store_true", help="the N processes under real FSDP2 (docs/accelerate/fsdp.yaml)")
    sharding.add_argument("--zero3", action="store_true",
                          help="the N processes under real DeepSpeed ZeRO-3 (docs/accelerate/deepspeed_zero3.yaml)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.sharded = "FSDP2" if args.fsdp else "DeepSpeed ZeRO-3" if args.zero3 else None
    if args.sharded and args.rounds < 2:
        parser.error("--fsdp / --zero3 need --rounds 2 or more: the policy is sharded from round 2 on")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-processes-"))
    run(1, args, out, name="warm")  # builds the embedded model into the shared cache: neither side pays for it
    n = args.processes
    setups = {"1": (1, ()), str(n): (n, ())}
    if args.generator == "vllm":
        setups[f"{n}, one engine"] = (n, ("generator.engines=main",))
    results = {name: run(processes, args, out, extra) for name, (processes, extra) in setups.items()}

    print(f"iterative DPO, {args.rounds} rounds x {args.prompts} prompts x 4 candidates ({args.generator}), global batch "
          f"{args.global_batch}, 1 epoch per round{f', N processes under {args.sharded}' if args.sharded else ''}; seconds "
          f"per round, mean over the rounds"
          f"{' after the first (the first generates before the policy is sharded)' if args.sharded else ''}\n")
    print("| processes | prompts per process | largest share | " + " | ".join(p.removesuffix("_s") for p in PARTS)
          + " | round | whole command |")
    print("|---" * (len(PARTS) + 5) + "|")
    means = {}
    for n, result in results.items():
        rounds = result["rounds"][1:] if args.sharded else result["rounds"]  # round 1 generates before sharding
        means[n] = {p: statistics.fmean(r[f"round/time/{p}"] for r in rounds) for p in PARTS}
        means[n]["round"] = sum(means[n][p] for p in PARTS)
        shares = [max(r["generate/prompts_per_process"]) / sum(r["generate/prompts_per_process"]) for r in rounds]
        print(f"| {n} | {rounds[0]['generate/prompts_per_process']} | {max(shares):.2f} | "
              + " | ".join(f"{means[n][p]:.2f}" for p in PARTS) + f" | {means[n]['round']:.1f} | {result['command_s']:.0f} |")
    for name in list(results)[1:]:
        print(f"| ratio {name} / 1 | | | " + " | ".join(f"{means[name][p] / max(means['1'][p], 1e-9):.2f}" for p in PARTS)
              + f" | {means[name]['round'] / means['1']['round']:.2f} | "
              f"{results[name]['command_s'] / results['1']['command_s']:.2f} |")
    for name in list(results)[1:]:
        same = all((results["1"]["dir"] / "rounds" / str(t) / "pools.jsonl").read_bytes()
                   == (results[name]["dir"] / "rounds" / str(t) / "pools.jsonl").read_bytes()
                   for t in range(1, args.rounds + 1))
        print(f"pools identical on 1 process and on {name}: {same}")
    print(f"run directories: {out}")


if __name__ == "__main__":
    main()
