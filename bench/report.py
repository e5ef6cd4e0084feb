"""What every benchmark run leaves behind: a printed table, a JSON file and a PNG chart, with the machine.

A run is a :class:`Report`: rows of measurements (a *series*, the thing measured, at a *point*, e.g.
an image size or a model) plus ratios between series measured side by side in that run. Rows for
things this machine cannot run are kept with status ``n/a`` and the reason, so a reader sees what
was *not* measured instead of guessing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from effnetv2.pipeline.format import atomic

from .timing import Timing

DEFAULT_OUT = Path("bench/out")


@dataclass
class Row:
    """One measurement: ``series`` at ``point``; ``timing`` is None unless status is ``ok``."""

    series: str
    point: str
    timing: Timing | None = None
    status: str = "ok"  # "ok" | "n/a" (cannot run here; see note) | "error" (ran and failed; see note)
    note: str = ""
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"series": self.series, "point": self.point, "status": self.status, "note": self.note,
                "params": self.params, "timing": self.timing.to_dict() if self.timing else None}


@dataclass
class Ratio:
    """``numerator`` / ``denominator`` (medians of two series at one point), measured in the same run."""

    name: str
    point: str
    numerator: str
    denominator: str
    value: float


@dataclass
class Report:
    bench: str
    title: str
    unit: str = "imgs/s"
    config: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # results that are not rates (e.g. stage-switch seconds)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def find(self, series: str, point: str) -> Row | None:
        return next((r for r in self.rows if r.series == series and r.point == point), None)

    def add_ratio(self, name: str, point: str, numerator: str, denominator: str) -> Ratio | None:
        """Record median(numerator) / median(denominator) at ``point`` when both were measured."""
        num, den = self.find(numerator, point), self.find(denominator, point)
        if not (num and den and num.timing and den.timing and den.timing.median > 0):
            return None
        ratio = Ratio(name, point, numerator, denominator, num.timing.median / den.timing.median)
        self.ratios.append(ratio)
        return ratio

    def to_dict(self) -> dict:
        return {"bench": self.bench, "title": self.title, "unit": self.unit,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
                "machine": self.machine, "config": self.config, "notes": self.notes,
                "rows": [r.to_dict() for r in self.rows],
                "ratios": [vars(r) for r in self.ratios], "extra": self.extra}


def machine(extra: dict | None = None) -> dict:
    """The machine a result belongs to: ``effnetv2 doctor``'s facts, plus e.g. a peer interpreter's."""
    from effnetv2.recipes.cli.doctor import collect

    return {**collect(), **(extra or {})}


def table(report: Report) -> str:
    """The run as plain text: one line per row, then the ratios."""
    header = ("point", "series", f"median {report.unit}", "min-max", "spread", "reps", "note")
    lines = []
    for r in report.rows:
        t = r.timing
        if t is None:
            lines.append((r.point, r.series, r.status, "", "", "", r.note))
        else:
            lines.append((r.point, r.series, f"{t.median:,.1f}", f"{t.low:,.1f}-{t.high:,.1f}",
                          f"{100 * t.spread:.0f}%", str(len(t.rates)), r.note))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [report.title, fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    if report.ratios:
        out.append("")
        out += [f"{r.name} @ {r.point}: {r.value:.2f}x  ({r.numerator} / {r.denominator})" for r in report.ratios]
    out += [f"note: {n}" for n in report.notes]
    m = report.machine
    if m:
        out.append(f"machine: {m.get('cpu')} ({m.get('cpu_count')} cores), GPU {m.get('gpu') or 'none'}, "
                   f"torch {m.get('torch')}, DALI {m.get('dali')}")
    return "\n".join(out)


def chart(report: Report, path: Path) -> Path:
    """Grouped bars: one group per point, one bar per series, whiskers from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(dict.fromkeys(r.point for r in report.rows))
    series = list(dict.fromkeys(r.series for r in report.rows))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(points) * len(series) * 0.35), 4.5))
    for j, name in enumerate(series):
        xs, ys, err = [], [], [[], []]
        for i, point in enumerate(points):
            row = report.find(name, point)
            if row is None or row.timing is None:
                continue
            t = row.timing
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(t.median)
            err[0].append(t.median - t.low)
            err[1].append(t.high - t.median)
        if xs:
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(range(len(points)), points, rotation=20 if len(points) > 4 else 0)
    ax.set_ylabel(f"{report.unit} (median, min-max)")
    m = report.machine
    ax.set_title(f"{report.title}\n{m.get('cpu', '')} x{m.get('cpu_count', '?')}, GPU {m.get('gpu') or 'none'}",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def publish(report: Report, out: Path | str = DEFAULT_OUT, *, quiet: bool = False) -> dict[str, Path]:
    """Print the table and write ``{bench}-{time}.json`` and ``.png`` under ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not report.machine:
        report.machine = machine()
    base = f"{report.bench}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem, n = base, 1
    while (out / f"{stem}.json").exists():  # two runs in one second keep both results
        n += 1
        stem = f"{base}-{n}"
    paths = {"json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    atomic.write_json(paths["json"], report.to_dict())
    chart(report, paths["png"])
    if not quiet:
        print(table(report))
        print(f"wrote {paths['json']} and {paths['png']}")
    return paths
