"""What a search shows: the top-k table (``top.md``), the accuracy / step-time chart (``search.png``) and the
best architecture as a model config file (``best.json``), all from the lines of ``results.jsonl``.

Rewards are recomputed from each line's A, S and P with the exponents asked for now, so rerunning with
other ``--w``/``--v`` re-ranks a finished search without training anything. P is normalised to the
backbone's (line 0) like S, so the backbone's reward is its accuracy (see ``effnetv2.model.search.reward``).
All files are written atomically.
"""

from __future__ import annotations

from pathlib import Path

from effnetv2.model import save_config
from effnetv2.model.config_file import config_from_dict
from effnetv2.model.search import pareto_front, reward
from effnetv2.pipeline.format import atomic

TABLE, CHART, BEST, RANK_TABLE = "top.md", "search.png", "best.json", "rank_check.md"


def ranked(records: list[dict], w: float, v: float) -> list[tuple[dict, float]]:
    """Finished candidates with their reward under (w, v), best first (ties: lower index first)."""
    ok = [r for r in records if r.get("status") == "ok"]
    base = next((r for r in ok if r["index"] == 0), None)
    if base is None:
        return []
    scored = [(r, reward(r["top1"], r["s_norm"], r["params"], base_step_time=1.0, base_params=base["params"],
                         w=w, v=v)) for r in ok]
    return sorted(scored, key=lambda x: (-x[1], x[0]["index"]))


def _name(r: dict) -> str:
    return f"c{r['index']:03d}" + (" (backbone)" if r["index"] == 0 else "")


def format_table(records: list[dict], top_k: int, w: float, v: float) -> str:
    """The top-k by reward as a Markdown table, with the backbone's row always shown."""
    rows = ranked(records, w, v)
    lines = [f"reward = A * S^{w:g} * P^{v:g} (S, P relative to the backbone, c000); "
             f"{len(rows)} trained, best first", "",
             "| rank | candidate | id | top-1 | S (x backbone) | step ms | params | reward | architecture |",
             "|---:|:---|:---|---:|---:|---:|---:|---:|:---|"]
    for rank, (r, rw) in enumerate(rows, 1):
        if rank > top_k and r["index"] != 0:
            continue
        lines.append(f"| {rank} | {_name(r)} | {r['id']} | {100 * r['top1']:.2f}% | {r['s_norm']:.3f} | "
                     f"{1000 * r['step_s']:.1f} | {r['params'] / 1e6:.3f}M | {rw:.4f} | {r['describe']} |")
    failed = [r for r in records if r.get("status") == "failed"]
    dups = [r for r in records if r.get("status") == "duplicate"]
    if failed:
        lines.append("\nfailed: " + "; ".join(f"{_name(r)} {r['error']}" for r in failed))
    if dups:
        lines.append("\nduplicates (not retrained): " + ", ".join(
            f"{_name(r)} = c{r['duplicate_of']:03d}" for r in dups))
    return "\n".join(lines)


def write_best(out: Path, records: list[dict], w: float, v: float) -> Path | None:
    """``best.json``: the best candidate by reward as a model config file (``--set model=<it>``)."""
    rows = ranked(records, w, v)
    if not rows:
        return None
    r, rw = rows[0]
    cfg = config_from_dict(r["config"], f"{out / 'results.jsonl'}: candidate {r['index']}")
    info = {"search": str(out), "index": r["index"], "id": r["id"], "top1": r["top1"], "s_norm": r["s_norm"],
            "step_s": r["step_s"], "params": r["params"], "reward": rw, "w": w, "v": v,
            "describe": r["describe"]}
    return save_config(cfg, out / BEST, info=info)


def plot(out: Path, records: list[dict], w: float, v: float, title: str = "") -> Path | None:
    """Top-1 against step time relative to the backbone; marker area ~ parameters; the Pareto front drawn,
    the backbone and the best by reward marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ranked(records, w, v)
    if not rows:
        return None
    rs = sorted((r for r, _ in rows), key=lambda r: r["index"])
    x, y = [r["s_norm"] for r in rs], [100 * r["top1"] for r in rs]
    pmax = max(r["params"] for r in rs)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter(x, y, s=[30 + 400 * r["params"] / pmax for r in rs], alpha=0.55, color="tab:blue",
               edgecolors="k", linewidths=0.5, label="candidate (area ~ parameters)")
    front = pareto_front(y, x)
    ax.plot([x[i] for i in front], [y[i] for i in front], "-", color="tab:orange", lw=1.5, label="Pareto front")
    base = rs[0]
    ax.scatter([base["s_norm"]], [100 * base["top1"]], marker="*", s=300, color="tab:red", zorder=3,
               label=f"backbone c000 ({base['params'] / 1e6:.2f}M)")
    best = rows[0][0]
    ax.scatter([best["s_norm"]], [100 * best["top1"]], s=500, facecolors="none", edgecolors="tab:green", lw=2,
               zorder=3, label=f"best reward c{best['index']:03d} ({best['params'] / 1e6:.2f}M)")
    xs = [min(x) * 0.95 + (max(x) * 1.05 - min(x) * 0.95) * i / 50 for i in range(51)]
    ax.plot(xs, [100 * base["top1"] * xi ** -w for xi in xs], "--", color="gray", lw=1,
            label="reward = backbone's (at its P)")  # A * S^w = A0: above it, better at equal size
    for r, xi, yi in zip(rs, x, y):
        ax.annotate(str(r["index"]), (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("training step time (x backbone's, measured on this machine)")
    ax.set_ylabel("proxy top-1 (%)")
    ax.set_title(f"effnetv2 search: {len(rs)} candidates" + (f"\n{title}" if title else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", markerscale=0.5)
    fig.tight_layout()
    path = out / CHART
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_all(out: Path, records: list[dict], top_k: int, w: float, v: float, title: str = "") -> None:
    """Table, chart and best.json from the lines so far."""
    atomic.write_text(out / TABLE, format_table(records, top_k, w, v) + "\n")
    plot(out, records, w, v, title)
    write_best(out, records, w, v)


def write_rank_check(out: Path, summary: dict) -> str:
    """The rank check as Markdown (``rank_check.md``); returns the text."""
    lines = [f"rank check: {summary['n']} candidates (top-{summary['k']} by reward + {summary['k']} random), "
             f"proxy {summary['proxy_epochs']:g} epochs vs {summary['epochs']:g} epochs",
             f"Kendall tau of top-1 = {summary['kendall_tau']:.3f} (p = {summary['p_value']:.3g})", "",
             "| candidate | id | proxy top-1 | longer top-1 |", "|:---|:---|---:|---:|"]
    lines += [f"| {_name(r)} | {r['id']} | {100 * r['proxy_top1']:.2f}% | {100 * r['top1']:.2f}% |"
              for r in summary["rows"]]
    text = "\n".join(lines)
    atomic.write_text(out / RANK_TABLE, text + "\n")
    return text
