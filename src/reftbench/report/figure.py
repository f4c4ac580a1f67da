"""The paper's Figure 1 for whatever was run: trainable parameters (% of the model, log scale)
against score, one point per method. Our runs are filled markers, the paper's hollow ones.

One panel per model and headline score: a table with the paper's Avg column is drawn at that
average (a method is drawn only where it has every task); a table without one, panel by task.
A method with no trainable parameters (the frozen model, a linear probe) has no place on a log
axis and is drawn as a dashed line.
"""
from collections import defaultdict
from pathlib import Path

from ..atomic import atomic_path


def panels(table_rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """{(model, task): rows}, where task is 'avg' for tables that have average rows."""
    with_avg = {r["model"] for r in table_rows if r["task"] == "avg"}
    out = defaultdict(list)
    for r in table_rows:
        if (r["task"] == "avg") == (r["model"] in with_avg):
            out[(r["model"], r["task"])].append(r)
    return dict(out)


def draw(table_rows: list[dict], path: Path, title: str) -> bool:
    """Write the figure to path (atomically); False when there is nothing to draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = {k: v for k, v in panels(table_rows).items()
              if any(r["mean"] is not None or r["paper"] is not None for r in v)}
    if not groups:
        return False
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, ((model, task), rows) in zip(axes.flat, sorted(groups.items())):
        for r in rows:
            pct = r["params_percent"]
            for value, filled in ((r["mean"], True), (r["paper"], False)):
                if value is None or pct is None:
                    continue
                if pct == 0:  # no trainable parameters: a reference line
                    ax.axhline(value, ls="--", lw=1, color="grey")
                    ax.annotate(r["method"], (0.01, value), xycoords=("axes fraction", "data"), fontsize=7,
                                color="grey", va="bottom")
                    continue
                style = dict(marker="o", color="C0") if filled else dict(marker="s", facecolors="none", edgecolors="C3")
                ax.scatter([pct], [value], s=36, zorder=3, **style)
                if filled and r.get("ci95") is not None:  # the 95% interval over seeds
                    ax.errorbar([pct], [value], yerr=[r["ci95"]], fmt="none", ecolor="C0", elinewidth=1, capsize=3)
                ax.annotate(r["method"], (pct, value), xytext=(4, 3), textcoords="offset points", fontsize=7,
                            color="black" if filled else "C3")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("trainable parameters (% of the model)")
        ax.set_ylabel("average score" if task == "avg" else f"{task} score")
        ax.set_title(f"{model}: {task}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", ls="", color="C0", label="reftbench (mean, 95% CI over seeds)")]
    if any(r["paper"] is not None for rows in groups.values() for r in rows):
        handles.append(plt.Line2D([], [], marker="s", ls="", markerfacecolor="none", color="C3", label="paper"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=130)
    finally:
        plt.close(fig)
    return True
