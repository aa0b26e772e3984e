"""The weight push into a live vLLM engine in one file against bounded buckets (`generator.push_bucket_mb`):
time of push + probe, the files it took, the largest file, and the most pushed bytes on disk at once
(/dev/shm, where the files go, polled every 2 ms), with ratios against one file, in one run.

Builds a Llama (default ~75M parameters, fp32, the char tokenizer) in memory, starts one persistent engine
from it, then for each bucket size adds noise to every weight and syncs (push, prefix-cache reset, probe: the
probe must pass, so every bucket arrived).

    python scripts/bench_push.py [--hidden 768 --layers 8 --buckets 1024 64 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import threading
import time

import torch
from bench_memory import llama  # scripts/ is on sys.path when this file runs

from prefrun.generate import VLLMGenerator
from prefrun.generate.weights import _buckets
from prefrun.model import iter_full_weights
from prefrun.tiny import char_tokenizer

PROMPTS = ["sort 3 1 4 1 5:", "sort 9 2 6:", "sort 5 3 5 8 9 7:", "sort 2 7 1 8 2 8:"]


class ShmPeak:
    """The most bytes used in /dev/shm above the level at the start, polled while the block runs."""

    def __enter__(self) -> ShmPeak:
        self.base, self.peak, self.running = shutil.disk_usage("/dev/shm").used, 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, shutil.disk_usage("/dev/shm").used - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--buckets", type=float, nargs="+", default=[1024, 64, 16], help="push_bucket_mb values")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = char_tokenizer()
    model = llama(tokenizer, args.hidden, args.layers).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = VLLMGenerator(num_candidates=1, max_new_tokens=8, probe_size=2, probe_tokens=4)
    rows, version = {}, 0
    try:
        generator.sync(model, tokenizer, probe_prompts=PROMPTS, version=0)
        for mb in args.buckets:
            bucketed = dataclasses.replace(generator, push_bucket_mb=mb)
            times, peaks = [], []
            for _ in range(args.repeats):
                version += 1
                with torch.no_grad():
                    for param in model.parameters():
                        param.add_(torch.randn_like(param) * 1e-3)
                with ShmPeak() as shm:
                    bucketed.sync(model, tokenizer, probe_prompts=PROMPTS, version=version)
                times.append(generator.sync_stats["sync/time_s"])
                peaks.append(shm.peak)
            largest = max(sum(t.numel() * t.element_size() for t in b.values()) for b in
                          _buckets(iter_full_weights(model, tied=True, buffers=True, to_cpu=False), mb * 2**20))
            rows[mb] = {"s": statistics.median(times), "files": generator.sync_stats["sync/push_buckets"],
                        "largest": largest, "shm": max(peaks), "diff": generator.sync_stats["sync/max_abs_logp_diff"]}
    finally:
        generator.close()
    print(f"Llama {size / 2**20:.0f} MiB fp32 ({args.layers} layers, hidden {args.hidden}), one persistent vLLM engine; "
          f"push + probe, median of {args.repeats}\n")
    print("| push_bucket_mb | files | largest file MiB | /dev/shm peak MiB | push + probe s | time ratio | probe diff |")
    print("|---|---|---|---|---|---|---|")
    first = rows[args.buckets[0]]
    for mb, r in rows.items():
        print(f"| {mb:g} | {r['files']} | {r['largest'] / 2**20:.1f} | {r['shm'] / 2**20:.1f} | {r['s']:.3f} | "
              f"{r['s'] / first['s']:.2f} | {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
