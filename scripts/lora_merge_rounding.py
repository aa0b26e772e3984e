"""How much of a LoRA round's update survives its merge into a 16-bit base (online rounds with LoRA and
`online.ref=previous` merge each round's adapters into the base weights: W <- bf16(W + B·A)).

For each size of update (the median |B·A| entry relative to the median |W| entry), a random rank-8 B·A is added
to every linear weight of a bf16 model and the sum rounded to bf16, as the merge stores it; prints the share of
entries whose update rounded away entirely and the relative error of the merged update, against fp32.

With `--runs`, online LoRA runs instead (rounds/<t>/policy_hat of each run directory): per round, the share of the
adapted (linear) weights' entries that differ from the start as the run loaded it, and the median size of that
difference relative to the weight (what the rounds kept of their updates).

    python scripts/lora_merge_rounding.py [--model <dir>]   # default: the embedded tiny model (built if needed)
    python scripts/lora_merge_rounding.py --runs <run dir> [<run dir> ...]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM

SIZES = (1e-1, 1e-2, 3e-3, 1e-3, 1e-4)


def embedded_model() -> str:
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train")
    return str(instantiate(cfg.model.build).materialize(Path(tempfile.gettempdir()) / "prefrun-lora-rounding",
                                                         instantiate(cfg.task)))


def kept_by_runs(runs: list[str]) -> None:
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from prefrun.online import load_weights

    print("| run | round | adapted entries moved from the start | median move / median weight |")
    print("|---|---|---|---|")
    for run in map(Path, runs):
        start = load_weights(json.loads((run / "summary.json").read_text())["model"])
        loaded = OmegaConf.load(run / "config.yaml").model.get("dtype")
        as_loaded = getattr(torch, loaded) if loaded in ("bfloat16", "float16") else torch.float32
        rounds = sorted((p for p in (run / "rounds").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        for round_dir in rounds:
            hat = load_weights(round_dir / "policy_hat")
            names = [n for n in hat if n.endswith("proj.weight")]
            moved = total = 0
            ratios = []
            for name in names:
                before = start[name].to(as_loaded).float()
                change = hat[name].float() - before
                moved, total = moved + int((change != 0).sum()), total + change.numel()
                ratios.append(float(change.abs().median() / before.abs().median()))
            print(f"| {run.name} | {round_dir.name} | {moved / total:.1%} | {sorted(ratios)[len(ratios) // 2]:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded tiny model)")
    parser.add_argument("--runs", nargs="+", default=None, help="online LoRA run directories to read instead")
    args = parser.parse_args()
    if args.runs:
        kept_by_runs(args.runs)
        return
    model = AutoModelForCausalLM.from_pretrained(args.model or embedded_model(), dtype=torch.bfloat16)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    generator = torch.Generator().manual_seed(0)
    print(f"{len(weights)} linear weights, {sum(w.numel() for w in weights) / 1e6:.2f}M entries, bf16")
    print("| median update / median weight | entries whose update rounded away | error of the merged update |")
    print("|---|---|---|")
    for size in SIZES:
        lost = total = 0
        error = norm = 0.0
        for w in weights:
            delta = torch.randn(w.shape[0], 8, generator=generator) @ torch.randn(8, w.shape[1], generator=generator)
            delta *= size * w.float().abs().median() / delta.abs().median()
            kept = (w.float() + delta).to(torch.bfloat16).float() - w.float()
            lost, total = lost + int((kept == 0).sum()), total + w.numel()
            error, norm = error + float((kept - delta).norm() ** 2), norm + float(delta.norm() ** 2)
        print(f"| {size:g} | {lost / total:.1%} | {(error / norm) ** 0.5:.1%} |")


if __name__ == "__main__":
    main()
