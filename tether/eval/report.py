"""The report writer every `tether eval` command uses: Markdown + PNG plots + a JSON of the numbers.

    rep = Report(out_dir, "Reward model report")
    rep.h2("Accuracy"); rep.table(["file", "accuracy"], rows); fig, ax = rep.figure(); ...; rep.save_figure(fig, "calibration", "caption")
    rep.metrics["file"] = {...}; rep.write()   # -> out_dir/report.md, out_dir/metrics.json, out_dir/*.png
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "x"


def _json_clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class Report:
    written: list["Report"] = []  # every report written in this process, for `tether eval --track` to send on

    def __init__(self, out: str | Path, title: str):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = [f"# {title}", ""]
        self.metrics: dict[str, Any] = {}
        self.figures: list[str] = []
        self.tables: dict[str, list[dict]] = {}  # by the heading above each table, for the trackers
        self._heading = "table"

    def h2(self, text: str) -> None:
        self.lines += [f"## {text}", ""]
        self._heading = text

    def h3(self, text: str) -> None:
        self.lines += [f"### {text}", ""]
        self._heading = text

    def text(self, md: str) -> None:
        self.lines += [md, ""]

    def bullets(self, items: list[str]) -> None:
        self.lines += [f"- {x}" for x in items] + [""]

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        if not rows:
            self.lines += ["(none)", ""]
            return
        key, n = slug(self._heading), 2
        while key in self.tables:
            key, n = f"{slug(self._heading)}_{n}", n + 1
        self.tables[key] = [{(h or "row"): v if isinstance(v, (int, float, str)) or v is None else fmt(v) for h, v in zip(headers, r)} for r in rows]
        cell = lambda v: fmt(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        self.lines.append("| " + " | ".join(headers) + " |")
        self.lines.append("|" + "|".join("---" for _ in headers) + "|")
        self.lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
        self.lines.append("")

    @staticmethod
    def figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
        fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
        return fig, (axes[0] if ncols > 1 else axes[0][0])

    @staticmethod
    def grid(n: int, per_row: int = 4, width: float = 4.0, height: float = 3.2):
        """n panels in rows of per_row (spare panels hidden): the figure and a flat list of n axes."""
        cols, rows = min(n, per_row), -(-n // per_row)
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
        flat = [a for row in axes for a in row]
        for a in flat[n:]:
            a.set_visible(False)
        return fig, flat[:n]

    def save_figure(self, fig, name: str, caption: str) -> str:
        fname = f"{slug(name)}.png"
        fig.tight_layout()
        fig.savefig(self.out / fname, dpi=110)
        plt.close(fig)
        self.figures.append(fname)
        self.lines += [f"![{caption}]({fname})", "", f"*{caption}*", ""]
        return fname

    def write(self) -> Path:
        (self.out / "report.md").write_text("\n".join(self.lines).rstrip() + "\n")
        (self.out / "metrics.json").write_text(json.dumps(_json_clean(self.metrics), indent=2) + "\n")
        Report.written.append(self)
        return self.out / "report.md"

    def numbers(self) -> dict[str, float]:
        """metrics.json's finite numbers as flat `a/b/c` keys (what a tracker plots); a list is followed where its
        items are named (a report's files, policies), not where they are bins of a plot."""
        def walk(v: Any, key: str):
            if isinstance(v, dict):
                for k, x in v.items():
                    yield from walk(x, f"{key}/{k}" if key else str(k))
            elif isinstance(v, list) and v and all(isinstance(x, dict) and (x.get("name") or x.get("file")) for x in v):
                for x in v:
                    yield from walk(x, f"{key}/{Path(str(x.get('name') or x['file'])).name}")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                yield key, float(v)

        return dict(walk(_json_clean(self.metrics), ""))


def reliability_plot(ax, bins: list[dict], label: str = "") -> None:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration and bin counts."""
    xs = [b["confidence"] for b in bins if b["count"]]
    ys = [b["accuracy"] for b in bins if b["count"]]
    ns = [b["count"] for b in bins if b["count"]]
    lo, hi = bins[0]["lo"], bins[-1]["hi"]
    ax.plot([lo, hi], [lo, hi], "--", color="gray", lw=1, label="perfect calibration")
    ax.plot(xs, ys, "o-", label=label or "model")
    for x, y, n in zip(xs, ys, ns):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color="dimgray")
    ax.set_xlim(lo - 0.02, hi + 0.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence σ(|r_chosen − r_rejected|)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def bar_plot(ax, labels: list[str], values: list[float], counts: list[int] | None = None, ylabel: str = "", ref: float | None = None) -> None:
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels([str(s)[:28] for s in labels], rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center", fontsize=8)
    if counts is not None:
        for i, (v, n) in enumerate(zip(values, counts)):
            ax.annotate(f"n={n}", (i, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    if ref is not None:
        ax.axhline(ref, ls="--", color="gray", lw=1)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
