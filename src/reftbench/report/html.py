"""`reftbench-report DIR --html OUT.html`: one self-contained results page (no server, no network).

Per table: the results table (click a column header to sort, type to filter), the per-task
breakdown in the paper's layout with the paper's numbers beside ours, and Figure 1 as an interactive
plotly chart (hover names the run; click a method in the legend to hide it). plotly.js is inlined
once, so the file opens offline; a Content-Security-Policy forbids any network access.

Every string that comes from a result file (model, method label, task, config values, sample
outputs) is HTML-escaped where it enters markup, and JSON-encoded with `<` escaped where it enters a
script, so a result file cannot inject script into the page.
"""
import csv
import io
import json
import math
from html import escape

from .figure import panels
from .stats import t_interval_from_std
from .tables import _texts, notes, one_decimal, wide

CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
       "img-src data: blob:; font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 16px 24px; color: #1b1f24; }
h1 { font-size: 22px; margin: 4px 0 12px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.note { color: #555; font-size: 13px; }
.scroll { overflow-x: auto; max-height: 70vh; overflow-y: auto; border: 1px solid #e3e3e3; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
th, td { padding: 4px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }
thead th { position: sticky; top: 0; background: #f6f8fa; cursor: pointer; user-select: none; }
table.results thead th::after { content: " \\2195"; color: #aaa; }
thead th[aria-sort=ascending]::after { content: " \\25B2"; color: #333; }
thead th[aria-sort=descending]::after { content: " \\25BC"; color: #333; }
tbody tr:hover { background: #f3f7ff; }
tr.avg td { font-weight: 600; }
input.filter { font-size: 14px; padding: 4px 8px; width: 320px; margin: 4px 0 8px; }
.paper { color: #b03a2e; }
details { margin: 6px 0; } summary { cursor: pointer; }
pre { white-space: pre-wrap; background: #f6f8fa; padding: 6px; margin: 4px 0; font-size: 12px; }
"""

SCRIPT = """
function cellValue(td) { const v = td.dataset.sort; return v === undefined ? td.textContent : v; }
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
  const dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
  table.querySelectorAll('thead th').forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', dir);
  const rows = Array.from(body.rows), sign = dir === 'ascending' ? 1 : -1;
  rows.sort((a, b) => {
    const x = cellValue(a.cells[col]), y = cellValue(b.cells[col]);
    const nx = parseFloat(x), ny = parseFloat(y);
    if (x === '' && y !== '') return 1;            // gaps last, either way
    if (y === '' && x !== '') return -1;
    if (!isNaN(nx) && !isNaN(ny)) return sign * (nx - ny);
    return sign * String(x).localeCompare(String(y));
  });
  rows.forEach(r => body.appendChild(r));
}
function filterRows(input) {
  const terms = input.value.toLowerCase().split(/\\s+/).filter(Boolean);
  const table = document.getElementById(input.dataset.table);
  Array.from(table.tBodies[0].rows).forEach(r => {
    const text = r.textContent.toLowerCase();
    r.hidden = !terms.every(t => text.includes(t));
  });
}
document.querySelectorAll('table.sortable thead th').forEach(th => th.addEventListener('click', () => sortBy(th)));
document.querySelectorAll('input.filter').forEach(i => i.addEventListener('input', () => filterRows(i)));
"""

NUMERIC = {"score": "mean", "seeds": "n", "paper": "paper", "Δ": "diff", "frozen": "frozen",
           "trainable params": "trainable", "% params": "params_percent", "train time": "train_seconds",
           "peak memory": "peak_rss_gib"}


def _sort_attr(sort) -> str:
    """The number a cell sorts by: a gap (None) sorts last; False: the cell sorts by its text."""
    if sort is False:
        return ""
    return f' data-sort="{"" if sort is None else repr(float(sort))}"'


def _cell(text: str, sort=False, cls: str = "") -> str:
    return f"<td{_sort_attr(sort)}{f' class={cls}' if cls else ''}>{escape(str(text))}</td>"


def results_table(table_rows: list[dict], table_id: str) -> str:
    texts = _texts(table_rows)
    if not texts:
        return "<p>No rows.</p>"
    header = list(texts[0])
    head = "".join(f"<th scope=col>{escape(h)}</th>" for h in header)
    body = []
    for r, t in zip(table_rows, texts):
        cells = "".join(_cell(t[h], r.get(NUMERIC[h]) if h in NUMERIC else r.get("delta") if h.startswith("Δ vs")
                              else False, "paper" if h == "paper" else "") for h in header)
        body.append(f"<tr{' class=avg' if r['task'] == 'avg' else ''}>{cells}</tr>")
    return (f'<input class=filter type=search placeholder="filter rows (e.g. loreft obqa)" '
            f'data-table="{table_id}" aria-label="filter rows">'
            f'<div class=scroll><table id="{table_id}" class="sortable results"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def breakdown_table(table_rows: list[dict], table_id: str) -> str:
    header, body = wide(table_rows)
    if not body:
        return ""
    head = "".join(f"<th scope=col>{escape(h)}</th>" for h in header)
    lines = []
    for line in body:
        cells = []
        for i, text in enumerate(line):
            ours, _, paper = text.partition(" (")
            try:
                sort = float(ours)
            except ValueError:
                sort = None if i >= 2 else False  # a gap in a number column; model and method sort as text
            inner = escape(ours) + (f' <span class=paper>({escape(paper)}</span>' if paper else "")
            cells.append(f"<td{_sort_attr(sort)}>{inner}</td>")
        lines.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class=scroll><table id="{table_id}" class=sortable><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(lines)}</tbody></table></div>')


def figure(table_rows: list[dict], title: str, include_plotlyjs: bool) -> str:
    """Figure 1: params % (log) against score, a panel per model and headline score, one legend
    entry per method (ours filled, the paper's hollow). Empty when nothing has a score."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    groups = {k: v for k, v in sorted(panels(table_rows).items())
              if any(r["mean"] is not None or r["paper"] is not None for r in v)}
    if not groups:
        return ""
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig = make_subplots(rows=nrows, cols=cols, horizontal_spacing=0.07, vertical_spacing=0.16 if nrows > 1 else 0.1,
                        subplot_titles=[escape(f"{m}: {'average' if t == 'avg' else t}") for m, t in groups])
    methods = list(dict.fromkeys(r["method"] for rows in groups.values() for r in rows))
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
              "#17becf"]
    shown = set()
    for i, ((model, task), rows) in enumerate(groups.items()):
        row, col = i // cols + 1, i % cols + 1
        pcts = [r["params_percent"] for r in rows if r["params_percent"]] or [1.0]
        span = [min(pcts) / 2, max(pcts) * 2]
        for r in rows:
            color = colors[methods.index(r["method"]) % len(colors)]
            for value, ours in ((r["mean"], True), (r["paper"], False)):
                if value is None or r["params_percent"] is None:
                    continue
                if r["params_percent"] == 0:  # nothing trains (the frozen model, a probe): a reference line
                    fig.add_trace(go.Scatter(
                        x=span, y=[value, value], mode="lines", line=dict(color=color, dash="dash", width=1.5),
                        name=escape(r["method"]), legendgroup=escape(r["method"]), showlegend=(r["method"], ours) not in shown,
                        hovertext=[f"<b>{escape(r['method'])}</b>: no trainable parameters<br>score {one_decimal(value)}"] * 2,
                        hoverinfo="text"), row=row, col=col)
                    shown.add((r["method"], ours))
                    continue
                ci = r.get("ci95") if ours else None
                spread = f" ± {one_decimal(ci)} (95% CI)" if ci is not None else ""
                who = "reftbench" if ours else "paper"
                hover = (f"<b>{escape(r['method'])}</b> ({who})<br>{escape(model)} · {escape(task)}<br>"
                         f"score {one_decimal(value)}{spread}" + (f" over {r['n']} seed(s)" if ours else "") +
                         f"<br>{r['params_percent']:.4f}% params"
                         + (f" ({r['trainable']:,})" if ours and r["trainable"] is not None else ""))
                key = (r["method"], ours)
                fig.add_trace(go.Scatter(
                    x=[r["params_percent"]], y=[value], mode="markers",
                    name=escape(r["method"]) + ("" if ours else " (paper)"), legendgroup=escape(r["method"]),
                    showlegend=key not in shown, hovertext=[hover], hoverinfo="text",
                    error_y=dict(type="data", array=[ci], visible=True, color=color) if ci is not None else None,
                    marker=dict(size=11 if ours else 10, color=color if ours else "rgba(0,0,0,0)",
                                symbol="circle" if ours else "square-open", line=dict(color=color, width=2))),
                    row=row, col=col)
                shown.add(key)
        lo, hi = math.log10(min(pcts) / 3), math.log10(max(pcts) * 3)  # at least two decades wide
        fig.update_xaxes(type="log", range=[lo, hi], dtick=1, exponentformat="none", ticksuffix="%",
                         title_text="trainable parameters (% of the model)", row=row, col=col)
        fig.update_yaxes(title_text="average score" if task == "avg" else "score", row=row, col=col)
    fig.update_layout(title_text=escape(title), height=360 * nrows + 80, template="plotly_white",
                      legend=dict(title_text="click a method to hide it"), margin=dict(l=50, r=20, t=80, b=70),
                      hoverlabel=dict(align="left"))
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs,
                       config={"displaylogo": False, "responsive": True})


def runs_section(records: list[dict]) -> str:
    """Each run: what it was, its score, the options it was started with and a few sample outputs."""
    if not records:
        return ""
    items = []
    for r in records:
        cfg = r.get("config") or {}
        trained = (r.get("metrics") or {}).get("trained") or {}
        score = trained.get("score", trained.get("accuracy"))
        title = " · ".join(str(x) for x in (r.get("model"), r.get("method"), r.get("task"), f"seed {r.get('seed')}"))
        meta = [f"table {cfg.get('table')}, row {cfg.get('row')}" if cfg.get("table") else "",
                f"score {100 * score:.1f}" if isinstance(score, (int, float)) else "",
                "overrides: " + " ".join(str(o) for o in r.get("overrides") or []) if r.get("overrides") else ""]
        samples = "".join(f"<pre>{escape(json.dumps(s, ensure_ascii=False, indent=1))}</pre>"
                          for s in (r.get("samples") or [])[:3])
        options = escape(json.dumps({k: cfg.get(k) for k in ("intervention", "trainer")}, ensure_ascii=False))
        items.append(f"<details><summary>{escape(title)}</summary><p class=note>"
                     f"{escape(' | '.join(m for m in meta if m))}</p><pre>{options}</pre>{samples}</details>")
    return f"<h2>Runs ({len(records)})</h2>" + "".join(items)


def page(found: dict[str, list[dict]], records: list[dict], source: str) -> str:
    """The whole page: one section per table, then the runs."""
    parts, plotly_inlined = [], False
    for n, (name, table_rows) in enumerate(found.items()):
        parts.append(f"<h2>{escape(name)}</h2>")
        parts.append("<h3>Results</h3><p class=note>Mean ± 95% CI over seeds (error bars in the figure); the "
                     "paired test against the reference method; the paper's number and the difference where the run "
                     "is one of the paper's rows; – is a gap. Click a column to sort.</p>")
        parts.append(results_table(table_rows, f"results-{n}"))
        parts.append("".join(f"<p class=note>{escape(line)}</p>" for line in notes(table_rows)))
        parts.append("<h3>Per task (the paper's number in brackets)</h3>")
        parts.append(breakdown_table(table_rows, f"tasks-{n}"))
        plot = figure(table_rows, f"Figure 1: {name}", include_plotlyjs=not plotly_inlined)
        if plot:
            plotly_inlined = True
            parts.append("<h3>Figure 1: parameters against score</h3>" + plot)
    from .sparsity import section as sparsity_section  # FineGates' score and speed against share removed
    parts.append(sparsity_section(records))
    parts.append(runs_section(records))
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>reftbench results: {escape(source)}</title><style>{STYLE}</style></head><body>"
            f"<h1>reftbench results</h1><p class=note>From {escape(source)}</p>"
            + "".join(parts) + f"<script>{SCRIPT}</script></body></html>\n")


FLOATS = ("mean", "std", "paper", "diff", "frozen", "params_percent", "train_seconds", "peak_rss_gib", "peak_gpu_gib",
          "ci95", "delta", "delta_low", "delta_high", "p")


def rows_from_csv(text: str) -> list[dict]:
    """A table's rows back from its CSV (raw numbers, empty = gap), for folders that keep the
    tables but not the runs' result.json files."""
    out = []
    for r in csv.DictReader(io.StringIO(text)):
        row = {k: (float(r[k]) if r.get(k) not in (None, "") else None) for k in FLOATS}
        row.update(model=r["model"], method=r["method"], task=r["task"], reference=r.get("reference") or None,
                   n=int(r["n"]) if r.get("n") else 0,
                   trainable=int(float(r["trainable"])) if r.get("trainable") else None, judged_offline=False)
        if row["ci95"] is None and row["std"] is not None and row["n"] > 1:  # a CSV from before the intervals
            row["ci95"] = t_interval_from_std(row["std"], row["n"])
        out.append(row)
    return out
