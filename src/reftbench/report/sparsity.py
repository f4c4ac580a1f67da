"""FineGates' sparsity sweep: score, share removed and compressed-model speed against the target sparsity.

    python -m reftbench.report.sparsity RUNS_DIR --out-dir results/finegates-sweep

One row per (model, task, target sparsity), mean ± sample std over seeds, from the runs' result.json:
- score: the test score of the run (the epoch picked on the selection split), and the selection score;
- removed: the authors' per-layer count as a share of the gated weights, the compressor's (what is
  physically gone) as a share of the non-embedding Linear weights, and of the whole model;
- speed-up: dense/compressed time, from `bench.json` beside result.json (scripts/bench_compress.py
  RUN_DIR --json; its CPU-time ratio) over the seeds that have one, else the runs' own end-of-run timing
  (`compressed.timing`, wall time of 5 passes over 2 batches: noisy on a shared machine).
Writes sweep.md, sweep.csv and sweep.png (score and speed-up against the share removed).
"""
import argparse
import base64
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from html import escape
from pathlib import Path

from ..atomic import atomic_path
from .tables import mean_or_none as _mean, one_decimal, score

FINEGATES = ("finegates", "finegates_lora")
COLUMNS = ["model", "task", "target", "n", "score", "score_std", "selection", "removed_gated", "removed_linear",
           "removed_model", "speedup", "speedup_source", "seeds"]


def load(root: Path) -> list[dict]:
    """FineGates records under root, each with its bench.json (if any) as `bench`."""
    out = []
    for path in sorted(Path(root).rglob("result.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (rec.get("config") or {}).get("intervention", {}).get("name") not in FINEGATES:
            continue
        bench = path.with_name("bench.json")
        if bench.is_file():
            rec["bench"] = json.loads(bench.read_text())
        out.append(rec)
    return out


def _std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def rows(records: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in records:
        iv = r["config"]["intervention"]
        groups[(r.get("model"), r.get("task"), float(iv.get("target_sparsity", 0)))].append(r)
    out = []
    for (model, task, target), runs in sorted(groups.items()):
        scores = [score((r.get("metrics") or {}).get("trained")) for r in runs]
        sel = [(r.get("train") or {}).get("selection_score") for r in runs]
        rep = [r.get("method_report") or {} for r in runs]
        comp = [r.get("compressed") or {} for r in runs]
        bench = [(r.get("bench") or {}).get("speedup_cpu", (r.get("bench") or {}).get("speedup")) for r in runs]
        timing = [(c.get("timing") or {}).get("speedup") for c in comp]
        use_bench = any(b is not None for b in bench)  # the benchmark where there is one: the steadier figure
        out.append({
            "model": model, "task": task, "target": target, "n": len(runs),
            "score": _mean(scores), "score_std": _std(scores), "selection": _mean(sel),
            "removed_gated": _mean([m.get("sparsity_gated") for m in rep]),
            "removed_linear": _mean([m.get("sparsity_cascade_linear") for m in rep]),
            "removed_model": _mean([c["params_removed_total"] / c["params_dense"] if c.get("params_dense") else None
                                    for c in comp]),
            "speedup": _mean(bench if use_bench else timing),
            "speedup_source": "bench" if use_bench else ("run" if any(timing) else ""),
            "seeds": ",".join(str(r.get("seed")) for r in runs),
        })
    return out


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x, scale=100.0):
    return "–" if x is None else one_decimal(scale * x)


def markdown(table: list[dict]) -> str:
    lines = ["| model | task | target s | seeds | test score | selection | removed: gated weights (per layer) "
             "| removed: non-embedding Linear (physical) | removed: model | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        spread = f" ± {_num(r['score_std'])}" if r["score_std"] is not None else ""
        speed = "–" if r["speedup"] is None else f"{r['speedup']:.2f}× ({r['speedup_source']})"
        lines.append(f"| {r['model']} | {r['task']} | {r['target']:.1f} | {r['n']} | {_num(r['score'])}{spread} | "
                     f"{_num(r['selection'])} | {_pct(r['removed_gated'])} | {_pct(r['removed_linear'])} | "
                     f"{_pct(r['removed_model'])} | {speed} |")
    # These rows are not the comparison tables of tables.py: say what the spread is and what it cannot show.
    lines += ["", "Test score: mean ± sample standard deviation over seeds. It is not a confidence interval,",
              "and no paired test was run. Differences of a few points between rows are within seed noise."]
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def png(table: list[dict]) -> bytes | None:
    """Score and speed-up against the share of the non-embedding Linear weights removed, a panel per
    (model, task); None when nothing was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = defaultdict(list)
    for r in table:
        if r["score"] is not None:
            panels[(r["model"], r["task"])].append(r)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, ((model, task), rs) in zip(axes.flat, sorted(panels.items())):
        rs = sorted(rs, key=lambda r: (r["removed_linear"] or 0, r["target"]))  # lines follow the x axis
        x = [100 * (r["removed_linear"] or 0) for r in rs]
        ax.errorbar(x, [100 * r["score"] for r in rs], yerr=[100 * (r["score_std"] or 0) for r in rs],
                    marker="o", color="#1f77b4", capsize=3, label="test score")
        for xi, r in zip(x, rs):
            ax.annotate(f"s={r['target']:.1f}", (xi, 100 * r["score"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.set_xlabel("non-embedding Linear weights removed (%)")
        ax.set_ylabel("test score", color="#1f77b4")
        ax.set_title(f"{model} · {task}")
        sp = [(xi, r["speedup"]) for xi, r in zip(x, rs) if r["speedup"] is not None]
        if sp:
            ax2 = ax.twinx()
            ax2.plot(*zip(*sp), marker="s", color="#d62728", label="speed-up")
            ax2.axhline(1.0, color="#d62728", lw=0.6, ls=":")
            ax2.set_ylabel("speed-up (dense / compressed)", color="#d62728")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def section(records: list[dict]) -> str:
    """The HTML page's section (empty without FineGates runs): the table and the plot, inline."""
    runs = [r for r in records if (r.get("config") or {}).get("intervention", {}).get("name") in FINEGATES]
    if not runs:
        return ""
    table = rows(runs)
    head = "".join(f"<th>{escape(c)}</th>" for c in ("model", "task", "target s", "seeds", "test score",
                                                      "removed (gated)", "removed (Linear, physical)", "speed-up"))
    def speed(r):
        return "–" if r["speedup"] is None else f"{r['speedup']:.2f}×"
    body = "".join(
        f"<tr><td>{escape(str(r['model']))}</td><td>{escape(str(r['task']))}</td><td>{r['target']:.1f}</td>"
        f"<td>{r['n']}</td><td>{_num(r['score'])}</td><td>{_pct(r['removed_gated'])}</td>"
        f"<td>{_pct(r['removed_linear'])}</td><td>{speed(r)}</td></tr>"
        for r in table)
    image = png(table)
    img = "" if image is None else f'<img alt="score and speed-up against share removed" src="data:image/png;base64,{base64.b64encode(image).decode()}">'
    return (f"<h2>FineGates: score and speed against the share removed</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>{img}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reftbench.report.sparsity", description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args(argv)
    records = load(args.dir)
    if not records:
        print(f"sparsity: no FineGates result.json under {args.dir}", file=sys.stderr)
        return 2
    table = rows(records)
    text = markdown(table)
    sys.stdout.write(text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in (("sweep.md", text.encode()), ("sweep.csv", to_csv(table).encode()), ("sweep.png", png(table))):
            if data is None:
                continue
            with atomic_path(args.out_dir / name) as tmp:
                Path(tmp).write_bytes(data)
        print(f"sparsity: wrote {args.out_dir}/sweep.{{md,csv,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
