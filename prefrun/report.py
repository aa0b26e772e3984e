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

COLUMNS = ("final loss", "final accuracy", "final margin", "before", "after", "after greedy", "win rate vs start",
           "LC win rate", "wall s")


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
        "win rate vs start": _win(after.get(primary)),
        "LC win rate": ((after.get(primary) or {}).get("vs_start") or {}).get("lc_win_rate"),
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
    if primary:
        note += (f" Win rate vs start: the `{primary}` samples against the starting policy's, judged pairwise, with the "
                 "95% bootstrap interval over prompts; LC: length-controlled (docs/evaluation.md).")
    rounds = round_table(jobs, keys, primary)
    (root / "report.md").write_text(f"# Report: {root}\n\n{note}\n\n" + "\n".join(lines) + "\n" + rounds)


def round_wins(job: dict, primary: str | None) -> list[tuple[int, str, dict]]:
    """An online job's pairwise win rates against the start: (round, which policy, winrate.summary), for θ̂_t
    (`policy_hat`) and APO's extrapolated θ_t (`policy`)."""
    out = []
    for result in job["summary"].get("rounds") or []:
        for which in ("policy_hat", "policy"):
            pairwise = ((result.get("eval") or {}).get(which) or {}).get(primary or "", {}).get("vs_start")
            if pairwise:
                out.append((result["round"], which, pairwise))
    return out


def round_table(jobs: list[dict], keys: list[str], primary: str | None) -> str:
    """Markdown: each online job's win rate against the start per round (θ̂_t; APO's extrapolated θ_t in
    parentheses), and, over the seeds of each setting, the mean and its standard error."""
    online = [job for job in jobs if round_wins(job, primary)]
    if not online:
        return ""
    total = max(t for job in online for t, _, _ in round_wins(job, primary))
    header = ["job", *keys, *(f"round {t}" for t in range(1, total + 1))]
    lines = ["", f"## Win rate against the starting policy, per round (`{primary}`)", "",
             "θ̂_t with its 95% interval over prompts; (APO's extrapolated θ_t).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in online:
        cells = {t: "" for t in range(1, total + 1)}
        for t, which, pairwise in round_wins(job, primary):
            if which == "policy_hat":
                low, high = pairwise["win_rate_interval"]
                cells[t] = f"{pairwise['win_rate']:.3f} [{low:.3f}, {high:.3f}]" + cells[t]
            else:
                cells[t] += f" ({pairwise['win_rate']:.3f})"
        lines.append("| " + " | ".join([job["name"], *(_short(job["overrides"].get(k, "")) for k in keys),
                                        *cells.values()]) + " |")
    settings = _over_seeds(online, keys, primary)
    if any(len(runs) > 1 for runs in settings.values()):
        lines += ["", "Mean ± standard error over seeds:", "",
                  "| setting | seeds | " + " | ".join(f"round {t}" for t in range(1, total + 1)) + " |",
                  "|" + "---|" * (total + 2)]
        for setting, runs in settings.items():
            cells = [mean_stderr([rates[t]["win_rate"] for rates in runs if t in rates]) for t in range(1, total + 1)]
            lines.append(f"| {setting or '(all)'} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _over_seeds(jobs: list[dict], keys: list[str], primary: str | None) -> dict[str, list[dict[int, dict]]]:
    """Each setting (the swept keys but the seed) -> per job, θ̂_t's pairwise summary by round."""
    settings: dict[str, list[dict[int, dict]]] = defaultdict(list)
    for job in jobs:
        setting = ", ".join(f"{k}={_short(job['overrides'].get(k, ''))}" for k in keys if k != "seed")
        settings[setting].append({t: w for t, which, w in round_wins(job, primary) if which == "policy_hat"})
    return settings


def mean_stderr(values: list[float]) -> str:
    """`mean ± standard error` of the values (one value as is; none: —)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def plot_round_wins(root: Path, jobs: list[dict], keys: list[str]) -> list[Path]:
    """Win rate against the start by round (round 0: the start itself, 0.5): one line per setting, error bars =
    the standard error over seeds, or the 95% interval over prompts for a single seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = _primary(jobs[0]["summary"])
    online = [job for job in jobs if round_wins(job, primary)]
    if not online:
        return []
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for setting, runs in _over_seeds(online, keys, primary).items():
        rounds = sorted({t for rates in runs for t in rates})
        means, below, above = [0.5], [0.0], [0.0]
        for t in rounds:
            found = [rates[t] for rates in runs if t in rates]
            mean = statistics.fmean(w["win_rate"] for w in found)
            if len(found) > 1:
                error = statistics.stdev(w["win_rate"] for w in found) / math.sqrt(len(found))
                low, high = mean - error, mean + error
            else:
                low, high = found[0]["win_rate_interval"]
            means.append(mean)
            below.append(mean - low)
            above.append(high - mean)
        ax.errorbar([0, *rounds], means, yerr=[below, above], marker="o", capsize=4,
                    label=f"{setting or 'run'} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("round (0: the starting policy)")
    ax.set_ylabel(f"win rate against the start ({primary})")
    ax.set_title("pairwise win rate per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = root / "win_rate_per_round.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


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
    return [root / "report.md", root / "report.csv", plot_curves(root, jobs, keys), *plot_scores(root, jobs, keys),
            *plot_round_wins(root, jobs, keys)]


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


def _win(result: dict | None) -> str | None:
    pairwise = (result or {}).get("vs_start")
    if not pairwise:
        return None
    low, high = pairwise["win_rate_interval"]
    return f"{pairwise['win_rate']:.3f} [{low:.3f}, {high:.3f}]"


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
