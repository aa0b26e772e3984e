"""How much of a LoRA round's update survives its merge into a 16-bit base (online rounds with LoRA and
`online.ref=previous` merge each round's adapters into the base weights: W <- bf16(W + B·A)).

For each size of update (the median |B·A| entry relative to the median |W| entry), a random rank-8 B·A is added
to every linear weight of a bf16 model and the sum rounded to bf16, as the merge stores it; prints the share of
entries whose update rounded away entirely and the relative error of the merged update, against fp32.

    python scripts/lora_merge_rounding.py [--model <dir>]   # default: the embedded tiny model (built if needed)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded tiny model)")
    args = parser.parse_args()
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
