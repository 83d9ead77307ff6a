"""The study's HTML page: the table, a curve of the metric vs labeled fraction per recipe, and one
`eval.html_report.build_report` page per fraction comparing the recipes' first-seed cells
(baseline first, so its paired bootstrap is against the baseline)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cxrdistill.atomic import write_text_atomic  # noqa: E402
from cxrdistill.errors import CxrDistillError  # noqa: E402
from cxrdistill.study.pseudo_counts import format_summary  # noqa: E402
from cxrdistill.study.spec import Cell, StudySpec, fraction_tag  # noqa: E402
from cxrdistill.study.table import claimed_direction, format_delta, format_markdown, format_mean  # noqa: E402


def _png(fig: Any, fmt: str = "png") -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _style(i: int) -> dict[str, Any]:
    """Distinct colour / marker / line style for the i-th recipe (stays distinct past 10 recipes)."""
    return {"color": plt.get_cmap("tab10")(i % 10), "marker": "osD^v<>ph*"[i % 10],
            "linestyle": ("-", "--", ":")[(i // 10) % 3]}


def fraction_curve(table: dict[str, Any], fractions: Sequence[float], fmt: str = "png") -> bytes:
    """PNG: the metric's seed mean (error bars: the CI over seeds) vs labeled fraction, one line per
    recipe; fractions are evenly spaced and the recipes slightly dodged so the bars do not overlap."""
    fig, ax = plt.subplots(figsize=(9, 5))
    n = len(table["rows"])
    for i, row in enumerate(table["rows"]):
        xs, ys, lo, hi = [], [], [], []
        for k, f in enumerate(fractions):
            entry = row["fractions"][fraction_tag(f)]
            if entry["mean"] is None:
                continue
            xs.append(k + 0.25 * (i - (n - 1) / 2) / max(n - 1, 1))
            ys.append(entry["mean"])
            low, high = entry["ci"]
            lo.append(entry["mean"] - low if low is not None else 0.0)
            hi.append(high - entry["mean"] if high is not None else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], capsize=2, label=row["label"], markersize=5, **_style(i))
    ax.set_xticks(range(len(fractions)), [f"{f:g}" for f in fractions])
    ax.set(xlabel=f"labeled fraction ({table['fraction_key']})", ylabel=table["metric"],
           title=f"{table['study']}: {table['metric']} (mean over seeds, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig, fmt)


def delta_plot(table: dict[str, Any], fractions: Sequence[float]) -> bytes | None:
    """PNG: one panel per fraction, each recipe's Δ vs the baseline with its paired-bootstrap CI;
    green / red when claimed above / below zero (`claimed_direction`), grey otherwise. None when there is no comparison."""
    rows = [r for r in table["rows"] if r["recipe"] != table["baseline"]]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(fractions), figsize=(3.2 * len(fractions) + 2.5, 0.35 * len(rows) + 1.5),
                             sharey=True, squeeze=False)
    for ax, f in zip(axes[0], fractions):
        for y, row in enumerate(rows):
            cmp = row["fractions"][fraction_tag(f)].get("vs_baseline") or {}
            if cmp.get("diff") is None:
                continue
            colour = {1: "tab:green", -1: "tab:red", 0: "grey"}[claimed_direction(cmp)]
            low = cmp.get("ci_low", cmp["diff"])
            high = cmp.get("ci_high", cmp["diff"])
            ax.errorbar([cmp["diff"]], [y], xerr=[[cmp["diff"] - low], [high - cmp["diff"]]], fmt="o",
                        color=colour, capsize=2)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"fraction {f:g}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"Δ {table['metric']}")
    axes[0][0].set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"Δ vs {table['baseline']} (paired bootstrap over test images, 95% CI)", fontsize=10,
                 y=1 + 0.3 / fig.get_figheight())  # above the panel titles
    return _png(fig)


def _delta_span(entry: dict[str, Any], against: str, prefix: str) -> str:
    """``<br><span>prefix Δ …</span>`` of one paired comparison of a table entry, coloured when claimed (`claimed_direction`)
    ("" without that comparison)."""
    cmp = entry.get(against) or {}
    if cmp.get("diff") is None:
        return ""
    cls = {1: " class='up'", -1: " class='down'", 0: ""}[claimed_direction(cmp)]
    return f"<br><span{cls}>{html.escape(prefix + format_delta(entry, against))}</span>"


def _html_table(table: dict[str, Any]) -> str:
    """The table as HTML: mean ± CI half-width per fraction and, below it, Δ vs the baseline
    (bold and coloured when claimed (`claimed_direction`))."""
    fr = table["fractions"]
    head = "<tr><th>recipe</th>" + "".join(f"<th>{html.escape(f[1:])}</th>" for f in fr) + "</tr>"
    body = []
    for row in table["rows"]:
        cells = []
        for f in fr:
            entry = row["fractions"][f]
            text = html.escape(format_mean(entry))
            ref = (entry.get("vs_reference") or {}).get("row")
            text += _delta_span(entry, "vs_baseline", "")  # Δ vs the baseline row
            text += _delta_span(entry, "vs_reference", f"vs {ref} ")  # Δ vs the row named in compare_to
            text += _delta_span(entry, "vs_teacher", "vs own teacher ")  # Δ vs the recipe's own teacher
            pseudo = format_summary(entry.get("pseudo"))
            if pseudo:
                text += f"<br><span class='note'>pseudo-boxes: {html.escape(pseudo)}</span>"
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr><td>{html.escape(row['label'])}</td>{''.join(cells)}</tr>")
    caption = (f"{html.escape(table['metric'])}: mean ± 95% CI half-width over seeds {table['seeds']} "
               f"({'Student t' if table['ci'] == 't' else 'bootstrap'}); Δ vs {html.escape(table['baseline'])}: "
               f"paired bootstrap over test images ({table['n_boot']} replicates), coloured when claimed (its CI over "
               "test images and, with two seeds or more, over seeds excludes zero); "
               "&quot;vs own teacher&quot;: student − the recipe's own supervised teacher")
    return (f"<table><caption>{caption}</caption><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")


def collapse_notes(cells: Sequence[Cell]) -> str:
    """HTML list of the cells whose pseudo-labels collapsed (their ``pseudo_selection*.json``)."""
    import json

    items = []
    for cell in cells:
        for path in sorted(cell.run_dir.glob("pseudo_selection*.json")):
            info = json.loads(path.read_text(encoding="utf-8")).get("collapse") or {}
            if info.get("collapsed"):
                kept = ", ".join(f"{k} {v}" for k, v in (info.get("kept_per_class") or {}).items())
                items.append(f"<li>{html.escape(cell.recipe)} fraction {cell.fraction:g} seed {cell.seed} "
                             f"({html.escape(path.name)}): {html.escape('; '.join(info.get('reasons', [])))}. "
                             f"Kept per class: {html.escape(kept)}</li>")
    if not items:
        return ""
    return ("<h2>Pseudo-label collapse</h2><p class='down'>These runs' teachers passed (almost) no pseudo-box; "
            "try <code>method.params.pseudo.selection=precision@0.8</code>.</p><ul>" + "".join(items) + "</ul>")


def build_study_report(spec: StudySpec, cells: Sequence[Cell], table: dict[str, Any], out_dir: Path,
                       max_images: int = 6, n_boot: int = 200) -> Path:
    """Write ``out_dir/report.html`` (+ ``report_<fraction>.html`` per fraction); returns the main page."""
    from cxrdistill.eval.html_report import build_report

    out_dir = Path(out_dir)
    links = []
    order = [spec.baseline_name, *[r for r in spec.table_rows if r != spec.baseline_name]]
    seed = spec.seeds[0]
    for fraction in spec.fractions:
        dirs = [c.run_dir for r in order for c in cells
                if c.recipe == r and c.fraction == fraction and c.seed == seed and c.done]
        if not dirs:
            continue
        page = out_dir / f"report_{fraction_tag(fraction)}.html"
        labels = [f"{r} (seed {seed})" for r in order for c in cells
                  if c.recipe == r and c.fraction == fraction and c.seed == seed and c.done]
        try:
            build_report(dirs, page, max_images=max_images, n_boot=n_boot, names=labels, metric=spec.metric)
            links.append(f'<li><a href="{page.name}">fraction {fraction:g}, seed {seed}</a>: '
                         f'{", ".join(html.escape(d.parent.parent.name) for d in dirs)}</li>')
        except CxrDistillError as err:
            links.append(f"<li>fraction {fraction:g}: report failed ({html.escape(str(err))})</li>")
    curve = base64.b64encode(fraction_curve(table, spec.fractions)).decode()
    deltas = delta_plot(table, spec.fractions)
    body = [
        f"<h1>Study {html.escape(spec.name)}</h1>",
        (f"<p>{len(cells)} cells: {len(spec.rows)} rows × {len(spec.fractions)} fractions × "
         f"{len(spec.seeds)} seeds ({sum(c.done for c in cells)} finished). "
         f"Baseline: {html.escape(spec.baseline_name)}.</p>"),
        f'<img alt="metric vs fraction" src="data:image/png;base64,{curve}">',
        *[_html_table(sub) for sub in (table.get("tables") or {table['metric']: table}).values()],
        collapse_notes(cells),
        *([f'<img alt="difference vs baseline" src="data:image/png;base64,{base64.b64encode(deltas).decode()}">']
          if deltas else []),
        "<h2>Per-fraction reports (first seed)</h2><ul>" + "".join(links) + "</ul>",
        f"<details><summary>Markdown (table.md)</summary><pre>{html.escape(format_markdown(table))}</pre></details>",
    ]
    _write_supplement(table, spec, out_dir)
    body.append('<p>For a supplement: <a href="table.csv">table.csv</a>, <a href="table.tex">table.tex</a>, '
                '<a href="fraction_curve.svg">fraction_curve.svg</a></p>')
    path = out_dir / "report.html"
    write_text_atomic(path, "<!doctype html><html><head><meta charset='utf-8'><title>"
                    f"{html.escape(spec.name)}</title><style>body{{font-family:system-ui,sans-serif;margin:24px}}"
                    "pre{background:#f7f7f7;padding:8px;font-size:12px}"
                    "table{border-collapse:collapse;margin:16px 0;font-size:13px}"
                    "td,th{border:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top}"
                    "td:first-child{text-align:left}caption{text-align:left;padding:4px 0;color:#555}"
                    ".up{color:#1a7f37;font-weight:600}.down{color:#c62828;font-weight:600}.note{color:#555;font-size:12px}</style></head><body>"
                    + "\n".join(body) + "</body></html>\n")
    return path


def _write_supplement(table: dict[str, Any], spec: StudySpec, out_dir: Path) -> None:
    """``table.csv`` / ``table.tex`` (mean, CI, Δ vs baseline per fraction) and ``fraction_curve.svg``."""
    import csv
    import io

    from cxrdistill.eval.html_report import _latex

    header = ["recipe", *[f"{f[1:]} {part}" for f in table["fractions"] for part in ("mean ± CI", "Δ vs baseline")]]
    rows = [[row["label"], *[text for f in table["fractions"]
                             for text in (format_mean(row["fractions"][f]), format_delta(row["fractions"][f]))]]
            for row in table["rows"]]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    write_text_atomic(out_dir / "table.csv", buf.getvalue())
    write_text_atomic(out_dir / "table.tex", _latex(header, rows, f"{spec.name}: {table['metric']}, mean ± 95% CI "
                                                    f"over seeds; Δ vs {table['baseline']} (paired bootstrap)"))
    write_text_atomic(out_dir / "fraction_curve.svg", fraction_curve(table, spec.fractions, fmt="svg").decode())


__all__ = ["build_study_report", "collapse_notes", "delta_plot", "fraction_curve"]
