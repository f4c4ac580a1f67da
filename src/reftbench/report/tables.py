"""Results tables from result.json records, beside the paper's numbers.

A *cell* is one (table, model, method row, task). Runs that differ only in their seed share a cell:
its score is the mean ± the half-width of a 95% confidence interval over seeds (Student t), with a
paired test over test examples against a reference method of the same column (report/stats.py).
A run that was one of the paper's rows (its experiment file sets `table` and `row`) and changed none of that file's settings
takes the paper's row name and sits beside the paper's number; any other run is labelled by its
method and the options in which it differs from its neighbours (`loreft (intervention.rank=8)`).
The paper's rows that were not run, and the tasks of a run row that are missing, are gaps ("–").
"""
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from ..tasks.loaders import matches
from . import stats
from .stats import one_decimal  # noqa: F401 (html.py and tests import it from here)

PAPER_FILE = files("reftbench") / "report" / "reft_paper.csv"
NO_TABLE = "results"  # runs that belong to no table (no `table` in their config)
# Overrides that leave a paper row's setting as it was: which of its test sets to score (`task`: every
# task of a table trains on the table's data, GLUE rows keep per-task settings), where the data and model
# files are, the seed, the device, and what is saved or logged. A data file named with `task.files.<role>`
# is neutral only when it is the paper's file (its checksum in the task config matches the file read);
# any file whose role has a checksum must match it, wherever task.data_dir points.
NEUTRAL = ("experiment", "task", "seed", "task.data_dir", "model.path", "device", "eval_batch_size",
           "save_intervention", "eval_frozen", "wandb.", "resume", "hydra.", "table")
GAP = "–"
METHOD_ORDER = ["none", "loreft", "direft", "noreft", "red", "lora", "dora", "bitfit", "finegates", "finegates_lora",
                "full"]


@dataclass
class PaperCell:
    table: str
    model: str
    method: str
    label: str
    params_percent: float
    task: str
    score: float


def load_paper(path=PAPER_FILE) -> list[PaperCell]:
    text = path.read_text() if hasattr(path, "read_text") else Path(path).read_text()
    rows = csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#"))
    return [PaperCell(r["table"], r["model"], r["method"], r["label"], float(r["params_percent"]), r["task"],
                      float(r["score"])) for r in rows]


def load_records(root: Path) -> list[dict]:
    """The test-split runs under root. Runs scored on the dev split (eval_split=dev: reftbench-tune's
    trials) are left out, so a tuning folder's table holds only its final runs' test scores."""
    records, dev = [], 0
    for path in sorted(root.rglob("result.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"reftbench-report: skipping {path}: {e}", file=sys.stderr)
            continue
        if (record.get("data") or {}).get("eval_split") == "dev":
            dev += 1
        else:
            records.append(record)
    if dev:
        print(f"reftbench-report: left out {dev} run(s) scored on the dev split (tuning trials)", file=sys.stderr)
    return records


def score(metrics: dict | None) -> float | None:
    """A run's score: `score` (any metric) or, in older records, `accuracy`."""
    if not metrics:
        return None
    value = metrics.get("score", metrics.get("accuracy"))
    return float(value) if isinstance(value, (int, float)) else None


def task_scores(record: dict, which: str = "trained") -> dict[str, float | None]:
    """{task: score} of one run: one entry, or one per test set for a run scored on several
    (commonsense, math). None where the run has no score (answers judged offline)."""
    m = (record.get("metrics") or {}).get(which)
    if m and isinstance(m.get("by_task"), dict):
        out = {}
        for name, v in m["by_task"].items():
            out[name] = score(v) if isinstance(v, dict) else (float(v) if isinstance(v, (int, float)) else None)
        return out
    return {record.get("task", "?"): score(m)}


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
    intervention = {k: v for k, v in (cfg.get("intervention") or {}).items() if k != "search"}  # reftbench-tune's space
    return _flat({"intervention": intervention, "trainer": cfg.get("trainer"), "task": cfg.get("task"),
                  "task_version": record.get("task_version")})


def paper_row(record: dict) -> str | None:
    """The paper's row this run reproduces: its experiment file names one and the command line
    changed nothing that file sets (only neutral keys such as the seed or the data folder)."""
    cfg = record.get("config") or {}
    if not cfg.get("row") or not cfg.get("table"):
        return None
    checksums = (cfg.get("task") or {}).get("checksums") or {}
    read = (record.get("data") or {}).get("files") or {}
    for o in record.get("overrides") or []:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith("task.files."):
            role = key[len("task.files."):]
            if not (role in checksums and role in read):  # another file, or one nobody can check
                return None
        elif not any(key == n or (n.endswith(".") and key.startswith(n)) for n in NEUTRAL):
            return None
    if any(role in checksums and not matches(checksums[role], files) for role, files in read.items()):
        return None
    return cfg["row"]


@dataclass
class Cell:
    table: str
    model: str
    label: str
    task: str
    row: str | None = None           # the paper's method id, where the run is the paper's setting
    runs: list = field(default_factory=list)   # records, one per seed
    paper: PaperCell | None = None
    average: bool = False            # the mean over the table's tasks: the cells in `parts`
    parts: list = field(default_factory=list)

    def scores(self, which="trained") -> list[float]:
        return [s for r in self.runs if (s := task_scores(r, which).get(self.task)) is not None]


def _seed_runs(runs: list[dict]) -> list[dict]:
    return list({r.get("seed"): r for r in runs}.values())  # a rerun of a seed replaces it


def build_cells(records: list[dict], paper: list[PaperCell]) -> dict[str, list[Cell]]:
    """{table: cells}, in the paper's row and task order, then runs the paper does not have."""
    groups = defaultdict(list)
    for r in records:
        cfg = r.get("config") or {}
        key = (cfg.get("table") or NO_TABLE, r.get("model", "?"), r.get("task", "?"), r.get("method", "?"),
               paper_row(r), tuple(sorted(options(r).items())))
        groups[key].append(r)
    labels = {p.method: p.label for p in paper}
    variants = defaultdict(list)
    for key in groups:
        if key[4] is None:
            variants[key[:4]].append(dict(key[5]))
    cells = {}
    for key, runs in groups.items():
        table, model, task, method, row, opts = key
        if row is not None:
            label = labels.get(row, row)
        else:
            mine, others = dict(opts), variants[key[:4]]
            differ = sorted(k for k in set().union(*others) if len({v.get(k) for v in others}) > 1)
            shown = ", ".join(f"{k}={mine.get(k, '-')}" for k in differ)
            label = method + (f" ({shown})" if differ else "")
        for t in task_scores(runs[0]):
            cell = cells.setdefault((table, model, label, t), Cell(table, model, label, t, row))
            cell.runs = _seed_runs(cell.runs + runs)
    # The paper's cells: beside a matching run, or as a row of gaps.
    run_tables = {c.table for c in cells.values()}
    for p in paper:
        if p.table not in run_tables:
            continue
        key = (p.table, p.model, p.label, p.task)
        cell = cells.setdefault(key, Cell(p.table, p.model, p.label, p.task, p.method))
        if cell.row == p.method:
            cell.paper = p
    return {t: _ordered([c for c in cells.values() if c.table == t], paper) for t in sorted(run_tables)}


def _ordered(cells: list[Cell], paper: list[PaperCell]) -> list[Cell]:
    order = {}
    for p in paper:
        order.setdefault(("m", p.model), len(order))
        order.setdefault(("r", p.model, p.label), len(order))
        order.setdefault(("t", p.task), len(order))
    big = len(order) + 1

    def method_rank(label):  # runs the paper has no row for: the frozen model first, full finetuning last
        name = label.split(" ")[0]
        return METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)
    cells = sorted(cells, key=lambda c: (order.get(("m", c.model), big), c.model, order.get(("r", c.model, c.label), big),
                                         method_rank(c.label), c.label, order.get(("t", c.task), big), c.task))
    # One average per row over the table's tasks, as the paper's Avg column.
    out, by_row = [], defaultdict(list)
    for c in cells:
        by_row[(c.model, c.label)].append(c)
    for (model, label), row in by_row.items():
        out.extend(row)
        several_sets = all(len(task_scores(r)) > 1 for c in row for r in c.runs)  # commonsense, math
        if len(row) > 1 and (any(c.paper for c in row) or several_sets):
            avg = Cell(row[0].table, model, label, "avg", row[0].row, average=True)
            avg.parts = row
            out.append(avg)
    return out


def seed_scores(cell: Cell) -> list[float]:
    """One score per seed (×100); for an average row, the per-seed mean over its tasks, for the
    seeds every task has."""
    if not cell.average:
        return [100 * s for s in cell.scores()]
    by_seed = [{r.get("seed"): s for r in c.runs if (s := task_scores(r).get(c.task)) is not None} for c in cell.parts]
    common = [k for k in by_seed[0] if all(k in b for b in by_seed)] if by_seed else []
    return [100 * statistics.mean(b[k] for b in by_seed) for k in common]


def strata(cell: Cell) -> dict[tuple, "stats.Stratum | None"]:
    """{(task, seed): per-example scores of that run} for the paired test; None where a run has none."""
    out = {}
    for c in (cell.parts if cell.average else [cell]):
        for r in c.runs:
            out[(c.task, r.get("seed"))] = stats.stratum(((r.get("metrics") or {}).get("trained") or {}), c.task)
    return out


def _is(cell: Cell, name: str) -> bool:
    name = name.lower()
    return name in (cell.label.lower(), (cell.row or "").lower(), cell.label.split(" ")[0].lower())


def paired_tests(cells: list[Cell], reference: str | None) -> dict[int, tuple[Cell, "stats.Paired | None"]]:
    """{id(cell): (its reference cell, the paired test or None for the reference itself)}: per model and
    task, `reference` (default loreft where present, else the first method run) against each method."""
    groups = defaultdict(list)
    for c in cells:
        if c.runs or c.average and any(p.runs for p in c.parts):
            groups[(c.model, c.task)].append(c)
    out = {}
    for group in groups.values():
        ref = next((c for c in group if _is(c, reference or "loreft")), None if reference else group[0])
        if ref is None:
            continue
        ref_strata = strata(ref)
        for c in group:
            test = None
            if c is not ref:
                pairs, note = stats.match(strata(c), ref_strata)
                test = stats.paired_test(pairs)
                test.note = note or test.note
            out[id(c)] = (ref, test)
    return out


def tuning(runs: list[dict]) -> dict | None:
    """The budget a tuned run's settings were found with (`config.tuned`, written by reftbench-tune)."""
    tuned = [(r.get("config") or {}).get("tuned") for r in runs]
    tuned = [t for t in tuned if isinstance(t, dict)]
    if not tuned:
        return None
    dev = [t.get("dev_size") or ((r.get("data") or {}).get("dev_size")) for r, t in zip(runs, tuned)]
    return {"trials": tuned[0].get("trials"), "max_steps": tuned[0].get("max_steps"),
            "dev_size": next((d for d in dev if d), None), "metric": tuned[0].get("metric")}


def mean_std(cell: Cell) -> tuple[float | None, float | None, int]:
    """Mean and sample std (×100) over seeds; for an average row: the mean of its task means,
    only when every task has a score (a missing task leaves the average a gap)."""
    if cell.average:
        means = [mean_std(c)[0] for c in cell.parts]
        if not means or any(m is None for m in means):
            return None, None, 0
        return statistics.mean(means), None, min(mean_std(c)[2] for c in cell.parts)
    values = [100 * s for s in cell.scores()]
    if not values:
        return None, None, 0
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def paper_score(cell: Cell) -> float | None:
    if cell.average:
        values = [c.paper.score if c.paper else None for c in cell.parts]
        return statistics.mean(values) if values and None not in values else None
    return cell.paper.score if cell.paper else None


def _runs(cell: Cell) -> list[dict]:
    if cell.average:
        return [r for c in cell.parts for r in c.runs]
    return cell.runs


def rows(cells: list[Cell], reference: str | None = None) -> list[dict]:
    """One dict per cell, raw numbers (None for a gap) and the text shown for them."""
    out = []
    tests = paired_tests(cells, reference)
    for c in cells:
        mean, std, n = mean_std(c)
        ref, test = tests.get(id(c), (None, None))
        paper = paper_score(c)
        runs = _runs(c)
        params = next((r["params"] for r in runs if r.get("params")), {})
        frozen = [100 * s for s in c.scores("frozen")]
        judged_offline = any("alpaca_eval_outputs" in ((r.get("metrics") or {}).get("trained") or {}) for r in runs)
        times = [r["train"]["train_seconds"] for r in runs if (r.get("train") or {}).get("train_seconds") is not None]
        rss = [m["cpu_peak_rss_gib"] for r in runs if (m := r.get("memory") or {}).get("cpu_peak_rss_gib") is not None]
        gpu = [m["cuda_peak_allocated_gib"] for r in runs
               if (m := r.get("memory") or {}).get("cuda_peak_allocated_gib") is not None]
        papers = [x.paper for x in c.parts if x.paper] if c.average else ([c.paper] if c.paper else [])
        sparsity_linear, sparsity, speedup = _compression(runs)
        pct = params.get("percent", papers[0].params_percent if papers else None)
        protocols = {((r.get("config") or {}).get("task") or {}).get("protocol") or "reft" for r in runs}
        out.append({
            "model": c.model, "method": c.label, "task": c.task,
            "mean": mean, "std": std, "n": n, "paper": paper,
            "ci95": stats.t_interval(seed_scores(c)) if mean is not None else None,
            "reference": ref.label if ref is not None else None,
            "delta": test.delta if test else None, "delta_low": test.low if test else None,
            "delta_high": test.high if test else None, "p": test.p if test else None,
            "test": test, "tuned": tuning(runs),
            "diff": mean - paper if mean is not None and paper is not None else None,
            "frozen": statistics.mean(frozen) if frozen else None,
            "trainable": params.get("trainable"),
            "params_percent": pct,
            "train_seconds": statistics.mean(times) if times else None,
            "peak_rss_gib": max(rss) if rss else None,
            "peak_gpu_gib": max(gpu) if gpu else None,
            "judged_offline": judged_offline and mean is None,
            # how prompts, loss and answers were made (task.protocol): reft, or llm_adapters (the
            # protocol of the paper's quoted LoRA/DoRA numbers); None for a row that was not run
            "protocol": "+".join(sorted(protocols)) if protocols else None,
            "sparsity_linear": sparsity_linear, "sparsity": sparsity, "speedup": speedup,
        })
    return out


def _compression(runs: list[dict]) -> tuple[float | None, float | None, float | None]:
    """Methods that remove weights (FineGates): the share of the non-embedding Linear weights removed (the
    ones that cost compute), the share of the model's parameters removed (the compressed checkpoint's, else
    the measured gates' cascade-aware count; never the target) and the inference speed-up dense/compressed,
    each a mean over seeds; None for other methods."""
    linear, shares, speedups = [], [], []
    for r in runs:
        c, m = r.get("compressed") or {}, r.get("method_report") or {}
        if m.get("sparsity_cascade_linear") is not None:
            linear.append(100 * m["sparsity_cascade_linear"])
        if c.get("params_dense"):
            shares.append(100 * c["params_removed_total"] / c["params_dense"])
        elif m.get("sparsity_cascade_model") is not None:
            shares.append(100 * m["sparsity_cascade_model"])
        if (c.get("timing") or {}).get("speedup"):
            speedups.append(c["timing"]["speedup"])
    return mean_or_none(linear), mean_or_none(shares), mean_or_none(speedups)


def mean_or_none(xs) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def _text(r: dict, has_paper: bool, has_frozen: bool = True, has_protocol: bool = False,
          has_sparsity: bool = False, test_header: str | None = None) -> dict[str, str]:
    if r["mean"] is None:
        score = "judged offline" if r["judged_offline"] else GAP
    else:
        score = one_decimal(r["mean"]) + (f" ± {one_decimal(r['ci95'])}" if r.get("ci95") is not None else "")
    memory = ", ".join(([f"{r['peak_gpu_gib']:.2f} GiB GPU"] if r["peak_gpu_gib"] is not None else [])
                       + ([f"{r['peak_rss_gib']:.2f} GiB RSS"] if r["peak_rss_gib"] is not None else []))
    text = {"model": r["model"], "method": r["method"], "task": r["task"], "score": score,
            "seeds": str(r["n"]) if r["n"] else GAP}
    if test_header:
        test = r.get("test")
        text[test_header] = ("reference" if r.get("reference") == r["method"] and r["mean"] is not None and not test
                             else stats.paired_text(test) if test and test.p is not None
                             else paired_csv_text(r) if r.get("p") is not None else GAP)
    if has_protocol:
        text["protocol"] = r.get("protocol") or GAP
    if has_paper:
        text["paper"] = one_decimal(r["paper"]) if r["paper"] is not None else GAP
        text["Δ"] = (("+" if r["diff"] >= 0 else "-") + one_decimal(abs(r["diff"]))) if r["diff"] is not None else GAP
    if has_frozen:
        text["frozen"] = one_decimal(r["frozen"]) if r["frozen"] is not None else GAP
    text.update({
        "trainable params": f"{r['trainable']:,}" if r["trainable"] is not None else GAP,
        "% params": f"{r['params_percent']:.4f}%" if r["params_percent"] is not None else GAP,
    })
    if has_sparsity:
        text["removed (Linear)"] = f"{r['sparsity_linear']:.1f}%" if r.get("sparsity_linear") is not None else GAP
        text["removed (model)"] = f"{r['sparsity']:.1f}%" if r.get("sparsity") is not None else GAP
        text["speed-up"] = f"{r['speedup']:.2f}×" if r.get("speedup") is not None else GAP
    text.update({
        "train time": duration(r["train_seconds"]) if r["train_seconds"] is not None else GAP,
        "peak memory": memory or GAP,
    })
    return text


def paired_csv_text(r: dict) -> str:
    """The test column from a row read back from CSV (no Paired object)."""
    return stats.paired_text(stats.Paired(r["delta"], r["delta_low"], r["delta_high"], r["p"]))


def test_header(table_rows: list[dict]) -> str | None:
    """`Δ vs loreft [95% CI], p`; None when no row has a test (no per-example scores anywhere)."""
    if not any(r.get("p") is not None for r in table_rows):
        return None
    refs = {r["reference"] for r in table_rows if r.get("reference")}
    return f"Δ vs {refs.pop() if len(refs) == 1 else 'reference'} [95% CI], p"


def _texts(table_rows: list[dict]) -> list[dict[str, str]]:
    """Display text per row; the paper's and the frozen columns only where some row has one."""
    has_paper = any(r["paper"] is not None for r in table_rows)
    has_frozen = any(r["frozen"] is not None for r in table_rows)
    has_protocol = any(r.get("protocol") not in (None, "reft") for r in table_rows)  # else all ReFT's
    has_sparsity = any(r.get("sparsity") is not None or r.get("sparsity_linear") is not None for r in table_rows)  # only methods that remove weights
    header = test_header(table_rows)
    return [_text(r, has_paper, has_frozen, has_protocol, has_sparsity, header) for r in table_rows]


def notes(table_rows: list[dict]) -> list[str]:
    """What is under a table: seeds, the interval, the test and its reference, runs left unpaired, and
    the tuning budget of tuned runs."""
    seeds = sorted({r["n"] for r in table_rows if r["n"]})
    if not seeds:
        return []
    span = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    out = [f"Score: mean over seeds ± half-width of its 95% CI over seeds (Student t); {span} seed(s) per cell"
           + ("; a cell of one seed has no interval." if seeds[0] == 1 else ".")]
    refs = list(dict.fromkeys(r["reference"] for r in table_rows if r.get("reference")))
    if any(r.get("p") is not None for r in table_rows):
        out.append(f"Δ vs {', '.join(refs)} (the reference, per model and task): a paired bootstrap over test "
                   f"examples, {stats.RESAMPLES} resamples (seeded), seed s paired with seed s, each seed and test "
                   "set resampled apart; the difference in points, its 95% percentile interval and a two-sided p; "
                   "n.s.: not significant at 0.05.")
    else:
        out.append("No paired test: no pair of runs with per-example scores on the same examples"
                   + (f" (reference {', '.join(refs)})." if refs else "."))
    unpaired = [f"{r['method']} / {r['task']}: {r['test'].note}" for r in table_rows
                if r.get("test") is not None and r["test"].note and r["mean"] is not None]
    if unpaired:
        out.append("Not (fully) paired: " + "; ".join(unpaired) + ".")
    alone = list(dict.fromkeys(f"{r['model']} / {r['task']}" for r in table_rows
                               if refs and r["mean"] is not None and not r.get("reference")))
    if alone:
        out.append("No run of the reference in: " + ", ".join(alone) + ".")
    tuned = {r["method"]: r["tuned"] for r in table_rows if r.get("tuned")}
    if tuned:
        out.append("Tuned on a dev split: " + "; ".join(
            f"{m}: {t['trials']} trials × {t['max_steps']} steps" + (f", dev split {t['dev_size']} examples"
                                                                     if t.get("dev_size") else "")
            + (f", by {t['metric']}" if t.get("metric") else "") for m, t in tuned.items()) + ".")
    return out


def markdown_notes(table_rows: list[dict]) -> str:
    return "".join(f"\n{n}\n" for n in notes(table_rows))


def markdown(table_rows: list[dict]) -> str:
    texts = _texts(table_rows)
    header = list(texts[0]) if texts else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(t[h] for h in header) + " |" for t in texts]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["model", "method", "task", "mean", "std", "n", "paper", "diff", "frozen", "trainable",
               "params_percent", "train_seconds", "peak_rss_gib", "peak_gpu_gib", "protocol", "sparsity_linear", "sparsity", "speedup",
               "ci95", "reference", "delta", "delta_low", "delta_high", "p"]


def to_csv(table_rows: list[dict]) -> str:
    """Raw numbers in percent; an empty field is a gap."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in table_rows:
        w.writerow(["" if r.get(k) is None else (round(r[k], 6 if k == "p" else 4) if isinstance(r[k], float) else r[k])
                    for k in CSV_COLUMNS])
    return buf.getvalue()


def _tex_escape(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        s = s.replace(ch, "\\" + ch)
    return s.replace("≥", r"$\geq$").replace("≤", r"$\leq$").replace("×", r"$\times$").replace("±", r"$\pm$").replace("–", "--").replace("Δ", r"$\Delta$").replace("~", r"\~{}")


def latex(table_rows: list[dict], caption: str = "", with_notes: bool = False) -> str:
    """A booktabs tabular of the same columns as the markdown table (needs \\usepackage{booktabs})."""
    texts = _texts(table_rows)
    header = [h for h in (list(texts[0]) if texts else []) if h not in ("train time", "peak memory")]
    align = "lll" + "r" * (len(header) - 3)
    lines = [r"\begin{tabular}{" + align + "}", r"\toprule",
             " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(t[h]) for h in header) + r" \\" for t in texts]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if with_notes and notes(table_rows):
        lines.append(r"\par\smallskip{\footnotesize " + " ".join(_tex_escape(n) for n in notes(table_rows)) + "}")
    if caption:
        lines.insert(0, f"% {caption}")
    return "\n".join(lines) + "\n"


def wide(table_rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The paper's layout: a row per model and method, a column per task (then the average);
    each cell our mean, with the paper's number in brackets where it has one."""
    tasks = list(dict.fromkeys(r["task"] for r in table_rows))
    if "avg" in tasks:
        tasks = [t for t in tasks if t != "avg"] + ["avg"]
    by_row = {}
    for r in table_rows:  # a row run under another protocol than ReFT's says so beside its name
        name = r["method"] + (f" [{r['protocol']}]" if r.get("protocol") not in (None, "reft") else "")
        by_row.setdefault((r["model"], name), {})[r["task"]] = r
    header = ["model", "method", "% params", *tasks]
    body = []
    for (model, method), cells in by_row.items():
        pct = next((c["params_percent"] for c in cells.values() if c["params_percent"] is not None), None)
        line = [model, method, f"{pct:.3f}" if pct is not None else GAP]
        for t in tasks:
            c = cells.get(t)
            ours = one_decimal(c["mean"]) if c and c["mean"] is not None else GAP
            line.append(ours + (f" ({one_decimal(c['paper'])})" if c and c["paper"] is not None else ""))
        body.append(line)
    return header, body


def markdown_wide(table_rows: list[dict]) -> str:
    header, body = wide(table_rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def latex_wide(table_rows: list[dict]) -> str:
    header, body = wide(table_rows)
    lines = [r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(c) for c in line) + r" \\" for line in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
