"""`prefrun report <run or multirun dir>`: one table of every job's overrides against its metrics
(report.md, report.csv) and PNG plots (training curves; final judged score against each swept key,
with error bars over seeds), written into that directory."""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from prefrun.errors import InputError

COLUMNS = ("final loss", "final accuracy", "final margin", "before", "after", "after greedy", "wall s")


def load_jobs(root: Path) -> list[dict]:
    """Every job under `root` that finished (has summary.json), with its command-line overrides."""
    jobs = []
    for summary_file in sorted(root.glob("**/summary.json"), key=lambda p: _natural(p.parent.relative_to(root))):
        job_dir = summary_file.parent
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        metrics_file = job_dir / "metrics.jsonl"
        jobs.append({
            "dir": job_dir,
            "name": str(job_dir.relative_to(root)) if job_dir != root else job_dir.name,
            "overrides": dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("hydra")),
            "summary": json.loads(summary_file.read_text()),
            # Training rows only: online runs also log one row per round (round/* keys, no loss).
            "metrics": [m for m in map(json.loads, metrics_file.read_text().splitlines()) if "loss" in m]
            if metrics_file.exists() else [],
        })
    if not jobs:
        raise InputError(f"{root}: no finished job (no summary.json below it); give a run or multirun directory")
    return jobs


def swept_keys(jobs: list[dict]) -> list[str]:
    keys = sorted({k for job in jobs for k in job["overrides"]})
    return [k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1]


def row(job: dict) -> dict:
    summary, final = job["summary"], job["summary"].get("final") or {}
    primary = _primary(summary)
    after, before = summary.get("eval_after", {}), summary.get("eval_before", {})
    return {
        "final loss": final.get("loss"),
        "final accuracy": final.get("rewards/accuracy"),
        "final margin": final.get("rewards/margin"),
        "before": _score(before.get(primary)),
        "after": _score(after.get(primary)),
        "after greedy": _score(after.get("greedy")),
        "wall s": summary.get("wall_time_s"),
    }


def write_tables(root: Path, jobs: list[dict], keys: list[str]) -> None:
    header = ["job", *keys, *COLUMNS]
    rows = [[job["name"], *(job["overrides"].get(k, "") for k in keys), *row(job).values()] for job in jobs]
    with (root / "report.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[_csv(v) for v in r] for r in rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(_short(v) if isinstance(v, str) else v) for v in r) + " |" for r in rows]
    primary = _primary(jobs[0]["summary"])
    note = f"Judged scores: held-out mean ± stderr, decoding `{primary}` (before / after training)." if primary else ""
    (root / "report.md").write_text(f"# Report: {root}\n\n{note}\n\n" + "\n".join(lines) + "\n")


def plot_curves(root: Path, jobs: list[dict], keys: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for job in jobs:
        steps = [m["step"] for m in job["metrics"]]
        label = ", ".join(f"{k}={_short(job['overrides'].get(k))}" for k in keys) or job["name"]
        for ax, key in zip(axes, ("loss", "rewards/accuracy", "rewards/margin")):
            ax.plot(steps, [m[key] for m in job["metrics"]], label=label, linewidth=1.2)
    for ax, title in zip(axes, ("training loss", "reward accuracy", "reward margin (chosen − rejected)")):
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = root / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(root: Path, jobs: list[dict], keys: list[str]) -> list[Path]:
    """For each swept key (other than the seed): mean after-training score per value, error bars
    = standard error over seeds (or the evaluation's own stderr when there is one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = _primary(jobs[0]["summary"])
    if not primary:
        return []
    paths = []
    for key in [k for k in keys if k != "seed"]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for job in jobs:
            groups[job["overrides"].get(key, "")].append(job["summary"]["eval_after"][primary])
        values = sorted(groups, key=_natural)
        means, errors = [], []
        for value in values:
            scores = [r["mean"] for r in groups[value]]
            means.append(statistics.fmean(scores))
            errors.append(statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1
                          else groups[value][0]["stderr"])
        before = statistics.fmean(job["summary"]["eval_before"][primary]["mean"] for job in jobs)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        numeric = all(_is_number(v) for v in values)
        xs = [float(v) for v in values] if numeric else list(range(len(values)))
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=4, label="after training")
        ax.axhline(before, color="grey", linestyle="--", label="before training")
        if not numeric:
            ax.set_xticks(xs, values, rotation=30)
        ax.set_xlabel(key)
        ax.set_ylabel(f"held-out judged score ({primary})")
        ax.set_title(f"score vs {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = root / f"score_vs_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def report(root: Path) -> list[Path]:
    jobs = load_jobs(root)
    keys = swept_keys(jobs)
    write_tables(root, jobs, keys)
    return [root / "report.md", root / "report.csv", plot_curves(root, jobs, keys), *plot_scores(root, jobs, keys)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prefrun report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory or a multirun directory")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        raise InputError(f"{args.run_dir}: not a directory; give a run or multirun directory under outputs/")
    for path in report(args.run_dir):
        print(path)


def _primary(summary: dict) -> str | None:
    after = summary.get("eval_after") or {}
    return "sampled" if "sampled" in after else next(iter(after), None)


def _score(result: dict | None) -> str | None:
    return None if not result else f"{result['mean']:.3f} ± {result['stderr']:.3f}"


def _md(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _short(text):
    """Overrides as typed, but a float drawn by a sweeper (0.5939321535345923) to 4 significant digits."""
    if isinstance(text, str) and _is_number(text) and len(text) > 8:
        return f"{float(text):.4g}"
    return text


def _csv(value):
    return "" if value is None else value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _natural(value):
    text = str(value)
    return (0, float(text), "") if _is_number(text) else (1, 0.0, text)
