"""`reftbench-report DIR [--out-dir OUT] [--html OUT.html] [--reference METHOD]`: the results tables of every
result.json under DIR, each score with its 95% interval over seeds and a paired test against METHOD.

For each table (the `table` its runs were started with; `results` for runs of no table): markdown,
CSV and LaTeX, and the paper's Figure 1 for what was run. Without --out-dir the markdown is printed.
--html writes one self-contained page of it all (report/html.py).
"""
import argparse
import sys
from pathlib import Path

from ..atomic import atomic_path
from .figure import draw
from .tables import (build_cells, latex, latex_wide, load_paper, load_records, markdown,  # noqa: F401
                     markdown_notes, markdown_wide, rows, score, task_scores, to_csv)



def wide_note(table_rows) -> str:
    brackets = "; the paper's number in brackets" if any(r["paper"] is not None for r in table_rows) else ""
    return f"\nThe same in the paper's layout (our mean over seeds{brackets}):\n\n"


def write_text_atomic(path, text: str) -> None:
    """A reader never sees half a table."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tables(records: list[dict], paper=None, reference: str | None = None) -> dict[str, list[dict]]:
    """{table name: rows}: numbers and gaps for every cell, the paper's beside ours; each method tested
    against `reference` (default loreft where a column has it, else its first method)."""
    cells = build_cells(records, load_paper() if paper is None else paper)
    return {name: rows(c, reference) for name, c in cells.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reftbench-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder searched recursively for result.json files")
    parser.add_argument("--out-dir", type=Path, help="write <table>.md, .csv, .tex and <table>.png here")
    parser.add_argument("--table", action="append", help="only this table (repeatable), e.g. --table table1")
    parser.add_argument("--no-figure", action="store_true", help="skip the figure")
    parser.add_argument("--html", type=Path, metavar="OUT.html",
                        help="also write one self-contained results page (sortable tables, interactive Figure 1)")
    parser.add_argument("--reference", metavar="METHOD",
                        help="the method each other is tested against (default: loreft where run, else the first)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"reftbench-report: {args.dir} is not a folder", file=sys.stderr)
        return 2
    records = load_records(args.dir)
    csvs = sorted(args.dir.glob("*.csv")) if args.html and not records else []  # a folder of tables only
    if not records and not csvs:
        print(f"reftbench-report: no readable result.json under {args.dir}", file=sys.stderr)
        return 2
    if csvs:
        from .html import rows_from_csv
        print(f"reftbench-report: no result.json under {args.dir}: the page shows its tables' CSV files "
              "(no per-run details)", file=sys.stderr)
        found = {p.stem: rows_from_csv(p.read_text()) for p in csvs}
    else:
        found = tables(records, reference=args.reference)
        if args.reference and not any(r.get("reference") for t in found.values() for r in t):
            print(f"reftbench-report: --reference {args.reference}: no run of that method under {args.dir}",
                  file=sys.stderr)
            return 2
    if args.table:
        missing = [t for t in args.table if t not in found]
        if missing:
            print(f"reftbench-report: no run of table {missing[0]} under {args.dir}; it has {', '.join(found)}",
                  file=sys.stderr)
            return 2
        found = {t: found[t] for t in args.table}
    if args.html:
        from .html import page
        write_text_atomic(args.html, page(found, records, source=str(args.dir)))
        print(f"reftbench-report: wrote {args.html}", file=sys.stderr)
    for name, table_rows in found.items():
        text = markdown(table_rows) + markdown_notes(table_rows) + wide_note(table_rows) + markdown_wide(table_rows)
        sys.stdout.write((f"## {name}\n\n" if len(found) > 1 else "") + text + ("\n" if len(found) > 1 else ""))
        if args.out_dir:
            write_text_atomic(args.out_dir / f"{name}.md", text)
            write_text_atomic(args.out_dir / f"{name}.csv", to_csv(table_rows))
            write_text_atomic(args.out_dir / f"{name}.tex", latex(table_rows, caption=f"reftbench {name}", with_notes=True) + "\n"
                              + latex_wide(table_rows))
            drawn = not args.no_figure and draw(table_rows, args.out_dir / f"{name}.png", title=f"reftbench {name}")
            print(f"reftbench-report: wrote {args.out_dir / name}.{{md,csv,tex{',png' if drawn else ''}}}",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
