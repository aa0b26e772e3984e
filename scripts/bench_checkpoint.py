"""How long a stop signal needs: prefrun's checkpoint save (accelerate's save_state, every file fsynced, then its
SHA-256 in the manifest) against accelerate's plain save_state followed by a sync (the baseline) and against the 30 s that torchrun and
SLURM's KillWait leave between SIGTERM and SIGKILL, for full fine-tunes of a few sizes (fp32 weights plus
AdamW's two moments: 12 bytes a parameter). Also the check resume makes (`latest()`: sizes and digests read
back). Prints, per size, the median seconds of a few saves and the ratios, and what this disk's rate means for a
7B model. Both are timed until the files are on the disk (the page cache alone would survive a SIGKILL, not a
node's crash).

    python scripts/bench_checkpoint.py
    python scripts/bench_checkpoint.py --sizes 10 50 200 --dir /scratch/you   # millions of parameters; the disk you will use
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from prefrun.checkpoint import Checkpoints, _quiet_accelerate

GRACE_S = 30.0


def model_of(millions: float) -> LlamaForCausalLM:
    """A Llama of about `millions` parameters (hidden 512 to 1024, vocabulary 32000, as many layers as fit)."""
    hidden = 512 if millions < 100 else 1024
    vocab = 32_000
    per_layer = 12 * hidden * hidden
    layers = max(1, round((millions * 1e6 - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def timed(fn) -> float:
    os.sync()  # each save starts with nothing of the last one left to write back
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 50, 150], help="millions of parameters")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="prefrun-bench-ckpt-", dir=args.dir))
    print(f"writing under {base}; grace between SIGTERM and SIGKILL: {GRACE_S:.0f} s")
    print(f"{'params':>8} {'ckpt MB':>8} {'save_state+sync s':>17} {'prefrun s':>10} {'prefrun/plain':>13} "
          f"{'resume check s':>14} {'MB/s':>7} {'of 30 s':>8}")
    rates = []
    try:
        for millions in args.sizes:
            torch.manual_seed(0)
            accelerator = Accelerator(cpu=True)
            model = model_of(millions)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            model.train()
            ids = torch.randint(0, model.config.vocab_size, (1, 16))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()  # the moments exist, as in a checkpoint mid-training
            model, optimizer = accelerator.prepare(model, optimizer)
            plain, ours, check = [], [], []
            checkpoints = Checkpoints(base / f"ours-{millions:g}", every=1, keep=1)
            for repeat in range(args.repeats):  # alternating, each first in turn: the page cache favours neither
                target = base / f"plain-{repeat}"

                def plain_save(target=target, accelerator=accelerator):  # on disk, as prefrun's (fsynced) is
                    with _quiet_accelerate():
                        accelerator.save_state(str(target))
                    os.sync()

                def ours_save(r=repeat, accelerator=accelerator, checkpoints=checkpoints):
                    checkpoints.save(accelerator, {"step": r + 1})

                for name in (("plain", "ours") if repeat % 2 else ("ours", "plain")):
                    (plain if name == "plain" else ours).append(timed(plain_save if name == "plain" else ours_save))
                shutil.rmtree(target)
                check.append(timed(checkpoints.latest))
            size = sum(f.stat().st_size for f in (base / f"ours-{millions:g}").rglob("*") if f.is_file())
            count = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
            best_plain, best_ours, best_check = (statistics.median(x) for x in (plain, ours, check))
            rates.append(size / best_ours)
            print(f"{count / 1e6:7.0f}M {size / 1e6:8.0f} {best_plain:17.2f} {best_ours:10.2f} "
                  f"{best_ours / best_plain:13.2f} {best_check:14.2f} {size / 1e6 / best_ours:7.0f} "
                  f"{best_ours / GRACE_S:7.1%}")
            shutil.rmtree(base / f"ours-{millions:g}")
            del model, optimizer, accelerator
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rate = min(rates)
    seven_b = 7e9 * 12
    print(f"at this disk's slowest rate ({rate / 1e6:.0f} MB/s) a checkpoint saved within {GRACE_S:.0f} s holds "
          f"{rate * GRACE_S / 1e9:.1f} GB: a full fine-tune of {rate * GRACE_S / 12 / 1e9:.2f}B parameters "
          f"(fp32 + AdamW); a 7B one ({seven_b / 1e9:.0f} GB) needs {seven_b / rate:.0f} s: ask SLURM for "
          f"--signal=USR1@{max(90, int(seven_b / rate * 1.5) // 30 * 30 + 30)}")


if __name__ == "__main__":
    main()
