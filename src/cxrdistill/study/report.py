"""The study's HTML page: the table, a curve of the metric vs labeled fraction per recipe, and one
`eval.html_report.build_report` page per fraction comparing the recipes' first-seed cells
(baseline first, so its paired bootstrap is against the baseline)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cxrdistill.errors import CxrDistillError  # noqa: E402
from cxrdistill.study.runner import Cell, fraction_tag  # noqa: E402
from cxrdistill.study.spec import StudySpec  # noqa: E402
from cxrdistill.study.table import format_markdown  # noqa: E402


def fraction_curve(table: dict[str, Any], fractions: Sequence[float]) -> bytes:
    """PNG: the metric's seed mean (error bars: the CI over seeds) vs labeled fraction, one line per recipe."""
    import io

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for row in table["rows"]:
        xs, ys, lo, hi = [], [], [], []
        for f in fractions:
            entry = row["fractions"][fraction_tag(f)]
            if entry["mean"] is None:
                continue
            xs.append(f)
            ys.append(entry["mean"])
            low, high = entry["ci"]
            lo.append(entry["mean"] - low if low is not None else 0.0)
            hi.append(high - entry["mean"] if high is not None else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=row["label"])
    ax.set(xlabel=f"labeled fraction ({table['fraction_key']})", ylabel=table["metric"],
           title=f"{table['study']}: {table['metric']} vs labeled fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def build_study_report(spec: StudySpec, cells: Sequence[Cell], table: dict[str, Any], out_dir: Path,
                       max_images: int = 6, n_boot: int = 200) -> Path:
    """Write ``out_dir/report.html`` (+ ``report_<fraction>.html`` per fraction); returns the main page."""
    from cxrdistill.eval.html_report import build_report

    out_dir = Path(out_dir)
    links = []
    order = [spec.baseline_name, *[r for r in spec.recipes if r != spec.baseline_name]]
    seed = spec.seeds[0]
    for fraction in spec.fractions:
        dirs = [c.run_dir for r in order for c in cells
                if c.recipe == r and c.fraction == fraction and c.seed == seed and c.done]
        if not dirs:
            continue
        page = out_dir / f"report_{fraction_tag(fraction)}.html"
        try:
            build_report(dirs, page, max_images=max_images, n_boot=n_boot)
            links.append(f'<li><a href="{page.name}">fraction {fraction:g}, seed {seed}</a>: '
                         f'{", ".join(html.escape(d.parent.parent.name) for d in dirs)}</li>')
        except CxrDistillError as err:
            links.append(f"<li>fraction {fraction:g}: report failed ({html.escape(str(err))})</li>")
    curve = base64.b64encode(fraction_curve(table, spec.fractions)).decode()
    body = [
        f"<h1>Study {html.escape(spec.name)}</h1>",
        f"<p>{len(cells)} cells: {len(spec.recipes)} recipes × {len(spec.fractions)} fractions × "
        f"{len(spec.seeds)} seeds. Baseline: {html.escape(spec.baseline_name)}.</p>",
        f'<img alt="metric vs fraction" src="data:image/png;base64,{curve}">',
        f"<pre>{html.escape(format_markdown(table))}</pre>",
        "<h2>Per-fraction reports (first seed)</h2><ul>" + "".join(links) + "</ul>",
    ]
    path = out_dir / "report.html"
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>"
                    f"{html.escape(spec.name)}</title><style>body{{font-family:system-ui,sans-serif;margin:24px}}"
                    "pre{background:#f7f7f7;padding:8px;font-size:12px}</style></head><body>"
                    + "\n".join(body) + "</body></html>\n", encoding="utf-8")
    return path


__all__ = ["build_study_report", "fraction_curve"]
