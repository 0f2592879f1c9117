"""`autoenc compare`: several runs' differing overrides and their figures in one table, CSV and chart."""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from autoenc.util.errors import UserError


def run_record(run_dir: Path) -> tuple[dict[str, str], dict[str, float]]:
    """A run's command-line overrides (`penalty`, `model.latent_dim`…) and its figures, named by where
    they come from: `val/…` and `test/…` (results.json) and `eval/…` (evaluation.json)."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
    figures = json.loads((run_dir / "results.json").read_text())
    if (run_dir / "evaluation.json").is_file():
        figures |= {f"eval/{k}": v for k, v in json.loads((run_dir / "evaluation.json").read_text()).items()}
    return dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o), figures


def resolve(name: str, names: list[str]) -> str:
    """A figure's full name from a full or unambiguous short one (`mse` → `test/mse` if alone)."""
    if name in names:
        return name
    matches = [n for n in names if n.split("/", 1)[-1] == name]
    if len(matches) != 1:
        raise UserError(f"{name!r} is {'ambiguous' if matches else 'not a figure of these runs'} (sort=, metrics=); "
                        f"choose from: {', '.join(names)}")
    return matches[0]


def compare(cfg: DictConfig) -> list[dict]:
    """One table of runs (their differing overrides and figures) sorted by a figure; CSV and bar chart."""
    if not cfg.runs:
        raise UserError("name the runs to compare: runs=[RUN_DIR,...] (a multirun directory counts for all its runs)")
    dirs = [Path(str(d)).expanduser() for d in ([cfg.runs] if isinstance(cfg.runs, str) else cfg.runs)]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d} is not a directory; give run or multirun directories: runs=[DIR,...]")
    run_dirs = sorted({p.parent.resolve() for d in dirs for p in d.rglob("results.json")})
    if not run_dirs:
        raise UserError(f"no results.json under {', '.join(map(str, dirs))}; give directories written by `autoenc train`")
    records = [run_record(r) for r in run_dirs]
    names = sorted({m for _, f in records for m in f})
    sort = resolve(cfg.sort, names)
    shown = list(dict.fromkeys([sort, *(resolve(m, names) for m in cfg.metrics or names)]))  # the sort figure first
    keys = sorted({k for o, _ in records for k in o})
    varying = [k for k in keys if len({o.get(k) for o, _ in records}) > 1]
    root = Path(os.path.commonpath([str(r) for r in run_dirs]))
    rows = [{"run": str(r.relative_to(root)) if r != root else r.name, **{k: o.get(k, "") for k in varying},
             **{m: f.get(m, "") for m in shown}} for r, (o, f) in zip(run_dirs, records)]
    rank = (sorted((r for r in rows if r[sort] != ""), key=lambda r: r[sort], reverse=cfg.descending)
            + [r for r in rows if r[sort] == ""])
    columns = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    print("\n".join("| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rank))
    prefix = Path(cfg.out).expanduser() if cfg.out else root / "comparison"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rank)
    bar_chart(rank, varying, sort, prefix.with_suffix(".png"))
    print(f"wrote {prefix.with_suffix('.csv')} and {prefix.with_suffix('.png')}")
    return rank


def bar_chart(rows: list[dict], label_keys: list[str], metric: str, path: Path) -> None:
    """Horizontal bars of one figure per run, each labelled by its run name and differing overrides,
    wrapped to a readable width; the figure grows with the runs and their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r[metric] != ""]
    labels = ["\n".join(textwrap.wrap(" ".join([r["run"], *(f"{k}={r[k]}" for k in label_keys)]), 40)) for r in shown]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.25 * lines + 0.15 * len(shown)))
    bars = ax.barh(range(len(shown)), [r[metric] for r in shown])
    ax.bar_label(bars, labels=[f"{r[metric]:.4g}" for r in shown], padding=3, fontsize=8)
    ax.set(yticks=range(len(shown)), xlabel=metric)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
