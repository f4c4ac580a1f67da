"""`reftbench-report DIR [--out FILE]`: one markdown table from every result.json under DIR.

Runs that differ only in their seed share a row: the score is the mean ± sample standard deviation
(n − 1) over seeds. Runs of one method with different options get separate rows, labelled by the
options that differ (e.g. `loreft (intervention.rank=8)`).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

COLUMNS = ["model", "task", "method", "score", "frozen", "trainable params", "% params", "train time", "peak memory"]


def write_text_atomic(path, text: str) -> None:
    """Like record.write_json_atomic: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_records(root: Path) -> list[dict]:
    records = []
    for path in sorted(root.rglob("result.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"reftbench-report: skipping {path}: {e}", file=sys.stderr)
    return records


def score(metrics: dict | None) -> float | None:
    """A run's score: `score` (any metric) or, in older records, `accuracy`."""
    if not metrics:
        return None
    value = metrics.get("score", metrics.get("accuracy"))
    return float(value) if isinstance(value, (int, float)) else None


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)  # hashable, readable
    return out


def options(record: dict) -> dict:
    """What makes runs different experiments, apart from the seed."""
    cfg = record.get("config") or {}
    return _flat({"intervention": cfg.get("intervention"), "trainer": cfg.get("trainer"), "task": cfg.get("task"),
                  "task_version": record.get("task_version")})


def group(records: list[dict]) -> list[tuple[tuple, list[dict]]]:
    groups = defaultdict(list)
    for r in records:
        key = (r.get("model", "?"), r.get("task", "?"), r.get("method", "?"), tuple(sorted(options(r).items())))
        groups[key].append(r)
    # Label rows of one (model, task, method) by the options in which they differ.
    by_method = defaultdict(list)
    for key in groups:
        by_method[key[:3]].append(dict(key[3]))
    rows = []
    for key, runs in groups.items():
        runs = list({r.get("seed"): r for r in runs}.values())  # a rerun of a seed replaces it
        variants = by_method[key[:3]]
        differ = sorted(k for k in set().union(*variants) if len({v.get(k) for v in variants}) > 1)
        mine = dict(key[3])
        label = key[2] + (f" ({', '.join(f'{k}={mine[k]}' if k in mine else f'{k}=-' for k in differ)})"
                          if differ else "")
        rows.append(((key[0], key[1], label), runs))
    return sorted(rows, key=lambda row: row[0])


def mean_std(values: list[float]) -> str:
    """×100, one decimal, as the paper's tables; ± sample std and the seed count when several."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} ({len(values)} seeds)"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def row(label: tuple, runs: list[dict]) -> list[str]:
    trained = [s for r in runs if (s := score(r.get("metrics", {}).get("trained"))) is not None]
    frozen = [s for r in runs if (s := score(r.get("metrics", {}).get("frozen"))) is not None]
    if not trained:  # alpaca_eval runs: answers to judge offline, no score here
        trained_text = f"{len(runs)} run(s), judged offline" if runs else "–"
    else:
        trained_text = mean_std(trained)
    params = runs[0].get("params") or {}
    times = [r["train"]["train_seconds"] for r in runs if (r.get("train") or {}).get("train_seconds") is not None]
    mem = [r.get("memory") or {} for r in runs]
    rss = [m["cpu_peak_rss_gib"] for m in mem if m.get("cpu_peak_rss_gib") is not None]
    gpu = [m["cuda_peak_allocated_gib"] for m in mem if m.get("cuda_peak_allocated_gib") is not None]
    memory = ", ".join(([f"{max(gpu):.2f} GiB GPU"] if gpu else []) + ([f"{max(rss):.2f} GiB RSS"] if rss else []))
    return [*label, trained_text, mean_std(frozen),
            f"{params['trainable']:,}" if "trainable" in params else "–",
            f"{params['percent']:.4f}%" if "percent" in params else "–",
            duration(statistics.mean(times)) if times else "–",
            memory or "–"]


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for label, runs in group(records):
        lines.append("| " + " | ".join(row(label, runs)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reftbench-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder searched recursively for result.json files")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"reftbench-report: {args.dir} is not a folder", file=sys.stderr)
        return 2
    records = load_records(args.dir)
    if not records:
        print(f"reftbench-report: no readable result.json under {args.dir}", file=sys.stderr)
        return 2
    text = table(records)
    sys.stdout.write(text)
    if args.out:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
