"""reftbench-report: tables (markdown, CSV, LaTeX) and Figure 1 from result.json files, beside the paper."""
import json

import pytest

from reftbench import report


def _record(method, seed, trained, frozen=0.25, task="chain-sum", model="tiny", seconds=90.0, rss=1.5,
            rank=4, key="accuracy", trainable=1000, percent=0.5):
    return {
        "method": method, "task": task, "model": model, "seed": seed,
        "metrics": {"frozen": {key: frozen, "n": 100}, "trained": {key: trained, "n": 100}},
        "params": {"trainable": trainable, "base": 200_000, "percent": percent},
        "train": {"steps": 10, "train_seconds": seconds, "final_loss": 0.1},
        "wall_seconds": seconds + 5, "memory": {"cpu_peak_rss_gib": rss},
        "config": {"seed": seed, "intervention": {"name": method, "rank": rank}, "trainer": {"lr": 4e-3}},
    }


def _write(root, name, record):
    path = root / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))


def _rows(text):
    lines = text.strip().split("\n\n")[0].splitlines()  # the first table (the paper's layout follows)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_mean_and_t_interval_over_seeds(tmp_path, capsys):
    # loreft: 0.50, 0.60, 0.70 -> mean 60.0, sample std sqrt(((-10)² + 0 + 10²) / 2) = 10.0
    for seed, acc, sec, rss in [(42, 0.5, 60, 1.0), (43, 0.6, 90, 2.5), (44, 0.7, 120, 2.0)]:
        _write(tmp_path / "multirun", f"loreft{seed}", _record("loreft", seed, acc, seconds=sec, rss=rss))
    # lora: 0.40 and 0.45 -> mean 42.5, sample std sqrt(2 · 2.5²) = 3.5355... -> 3.5
    for seed, acc in [(42, 0.40), (43, 0.45)]:
        _write(tmp_path, f"lora{seed}", _record("lora", seed, acc, frozen=0.2, trainable=56_098_816, percent=0.82563))
    out = tmp_path / "out"
    assert report.main([str(tmp_path), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "results.md").read_text() == printed
    rows = {r["method"]: r for r in _rows(printed)}
    assert set(rows) == {"loreft", "lora"}
    # ± is the 95% t interval: t(0.975, 2) · 10 / √3 = 4.303 · 5.774 = 24.84
    assert rows["loreft"]["score"] == "60.0 ± 24.8" and rows["loreft"]["seeds"] == "3"
    assert rows["loreft"]["frozen"] == "25.0"
    assert rows["loreft"]["train time"] == "1m 30s"  # mean of 60, 90, 120 s
    assert rows["loreft"]["peak memory"] == "2.50 GiB RSS"  # the largest peak
    assert rows["lora"]["score"] == "42.5 ± 31.8" and rows["lora"]["seeds"] == "2"  # 12.706 · 3.536 / √2
    assert rows["lora"]["trainable params"] == "56,098,816"
    assert rows["lora"]["% params"] == "0.8256%"
    assert rows["lora"]["task"] == "chain-sum" and rows["lora"]["model"] == "tiny"


def test_single_run_and_score_key(tmp_path, capsys):
    _write(tmp_path, "a", _record("red", 42, 0.812, key="score", seconds=7, rss=0.3))
    assert report.main([str(tmp_path)]) == 0
    (row,) = _rows(capsys.readouterr().out)
    assert row["score"] == "81.2" and row["seeds"] == "1"
    assert row["train time"] == "7s" and row["peak memory"] == "0.30 GiB RSS"


def test_different_options_are_different_rows(tmp_path, capsys):
    _write(tmp_path, "r4", _record("loreft", 42, 0.5, rank=4))
    _write(tmp_path, "r8a", _record("loreft", 42, 0.6, rank=8))
    _write(tmp_path, "r8b", _record("loreft", 43, 0.8, rank=8))
    _write(tmp_path, "other", _record("loreft", 42, 0.9, task="word-reversal"))
    assert report.main([str(tmp_path)]) == 0
    rows = {(r["task"], r["method"]): r["score"] for r in _rows(capsys.readouterr().out)}
    assert rows == {("chain-sum", "loreft (intervention.rank=4)"): "50.0",
                    ("chain-sum", "loreft (intervention.rank=8)"): "70.0 ± 127.1",  # 12.706 · 14.14 / √2
                    ("word-reversal", "loreft"): "90.0"}


def test_alpaca_eval_runs_have_no_score(tmp_path, capsys):
    rec = _record("loreft", 42, 0.5, task="alpaca")
    rec["metrics"] = {"trained": {"alpaca_eval_outputs": "x.json", "n": 805}}
    _write(tmp_path, "a", rec)
    assert report.main([str(tmp_path)]) == 0
    (row,) = _rows(capsys.readouterr().out)
    assert row["score"] == "judged offline" and "frozen" not in row  # no run has a frozen score: no column


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: None])
def test_no_results_is_one_line_and_exit_2(tmp_path, capsys, make):
    folder = tmp_path / "empty"
    make(folder)
    assert report.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(folder) in err


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "t.md"
    report.write_text_atomic(target, "a\n")
    report.write_text_atomic(target, "b\n")
    assert target.read_text() == "b\n" and [p.name for p in tmp_path.iterdir()] == ["t.md"]


def test_console_script_is_declared():
    import tomllib
    from pathlib import Path
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["reftbench-report"] == "reftbench.report:main"


def test_task_options_split_rows_and_a_rerun_seed_counts_once(tmp_path):
    a, b, c = (_record("loreft", 42, acc) for acc in (0.5, 0.6, 0.7))
    a["config"]["task"] = {"train_limit": 1000}
    b["config"]["task"] = {"train_limit": 2000}
    c["config"]["task"] = {"train_limit": 1000}  # the same experiment and seed again: replaces a
    for name, rec in (("a", a), ("b", b), ("c", c)):
        _write(tmp_path, name, rec)
    rows = {r["method"]: r["score"] for r in _rows(report.markdown(report.tables(report.load_records(tmp_path))["results"]))}
    assert rows == {"loreft (task.train_limit=1000)": "70.0", "loreft (task.train_limit=2000)": "60.0"}


# ---- the paper's numbers ----------------------------------------------------------------------

CS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa"]
GLUE = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]


def _table_run(table, row, method, model, task, seed, by_task=None, acc=None, overrides=(), percent=0.031):
    rec = _record(method, seed, acc if acc is not None else 0.0, task=task, model=model, percent=percent)
    rec["config"].update({"table": table, "row": row})
    rec["overrides"] = [f"experiment={table}_{row}_x", f"seed={seed}", *overrides]
    if by_task is not None:
        rec["metrics"] = {"trained": {"score": sum(by_task.values()) / len(by_task), "n": 800,
                                      "by_task": {t: {"score": v, "n": 100} for t, v in by_task.items()}}}
    return rec


def _by(rows, model, method):
    return {r["task"]: r for r in rows if r["model"] == model and r["method"] == method}


def test_paper_file_is_complete_and_its_averages_are_the_papers():
    paper = report.load_paper()
    cells = {}
    for p in paper:
        cells.setdefault((p.table, p.model, p.method), {})[p.task] = p.score
    sets = {"table1": set(CS), "table2": {"aqua", "gsm8k", "mawps", "svamp"}, "table3": {"ultrafeedback"}}
    for (table, model, method), scores in cells.items():
        assert set(scores) == sets.get(table, set(GLUE)), (table, model, method)

    def avg(*key):
        return round(sum(cells[key].values()) / len(cells[key]) + 1e-9, 1)  # the paper rounds half up
    # The Avg column as printed in the paper (Tables 1, 2 and 4).
    assert avg("table1", "llama-7b", "loreft") == 80.2 and avg("table1", "llama-13b", "loreft") == 83.3
    assert avg("table1", "llama-7b", "lora") == 74.7 and avg("table1", "llama-7b", "dora") == 78.1
    assert avg("table2", "llama-7b", "loreft") == 42.6 and avg("table2", "llama-13b", "lora") == 51.1
    assert avg("table4", "roberta-base", "loreft") == 84.2 and avg("table4", "roberta-large", "lora") == 88.1


def test_a_paper_row_sits_beside_the_paper_with_its_difference_and_average(tmp_path):
    # LoReFT on LLaMA-7B, table 1, two seeds: every set at 70% then 80% -> mean 75.0, std 7.1
    for seed, acc in ((42, 0.70), (43, 0.80)):
        _write(tmp_path, f"s{seed}", _table_run("table1", "loreft", "loreft", "llama-7b", "commonsense", seed,
                                                by_task={t: acc for t in CS}))
    rows = report.tables(report.load_records(tmp_path))["table1"]
    mine = _by(rows, "llama-7b", "LoReFT")
    assert list(mine) == CS + ["avg"]  # the paper's task order, then the average
    assert mine["boolq"]["mean"] == pytest.approx(75.0) and mine["boolq"]["std"] == pytest.approx(7.0711, abs=1e-4)
    assert mine["boolq"]["n"] == 2 and mine["boolq"]["paper"] == 69.3
    assert mine["boolq"]["diff"] == pytest.approx(75.0 - 69.3)
    assert mine["hellaswag"]["paper"] == 93.1 and mine["hellaswag"]["diff"] == pytest.approx(75.0 - 93.1)
    assert mine["avg"]["mean"] == pytest.approx(75.0) and round(mine["avg"]["paper"], 1) == 80.2
    # The paper's other rows are there, with gaps (None), never zeros, for what was not run.
    preft = _by(rows, "llama-7b", "PrefT")
    assert preft["boolq"]["paper"] == 64.3 and preft["boolq"]["mean"] is None and preft["avg"]["mean"] is None
    assert _by(rows, "llama-13b", "LoReFT")["piqa"]["mean"] is None
    md = report.markdown(rows)
    line = next(x for x in md.splitlines() if "| LoReFT | boolq |" in x and "llama-7b" in x)
    assert "| 75.0 ± 63.5 | 2 | 69.3 | +5.7 |" in line  # t(0.975, 1) · 7.071 / √2 = 63.5
    gap = next(x for x in md.splitlines() if "| PrefT | boolq |" in x and "llama-7b" in x)
    assert "| – | – | 64.3 | – |" in gap
    csv_line = next(x for x in report.to_csv(rows).splitlines() if x.startswith("llama-7b,PrefT,boolq,"))
    assert csv_line.startswith("llama-7b,PrefT,boolq,,,0,64.3,,")  # empty fields for the gap


def test_a_changed_setting_is_not_matched_to_the_paper(tmp_path):
    _write(tmp_path, "a", _table_run("table1", "loreft", "loreft", "llama-7b", "commonsense", 42,
                                     by_task={t: 0.5 for t in CS}, overrides=["intervention.rank=4"]))
    _write(tmp_path, "b", _table_run("table1", "loreft", "loreft", "llama-7b", "commonsense", 42,
                                     by_task={t: 0.6 for t in CS}, overrides=["task.data_dir=/data", "device=cuda"]))
    _write(tmp_path, "c", _table_run("table1", "loreft", "loreft", "llama-7b", "commonsense", 43,
                                     by_task={t: 0.4 for t in CS}, overrides=["task.train_limit=100"]))
    rows = report.tables(report.load_records(tmp_path))["table1"]
    changed = _by(rows, "llama-7b", "loreft")
    assert changed["boolq"]["mean"] == pytest.approx(45.0) and changed["boolq"]["paper"] is None
    assert _by(rows, "llama-7b", "LoReFT")["boolq"]["mean"] == pytest.approx(60.0)  # data path: still the paper's


def test_missing_tasks_of_a_row_are_gaps_and_leave_the_average_a_gap(tmp_path):
    for seed, acc in ((42, 0.90), (43, 0.94)):
        _write(tmp_path, f"sst2-{seed}", _table_run("table4", "loreft", "loreft", "roberta-base", "sst2", seed,
                                                    acc=acc, percent=0.015, overrides=["task=sst2"]))
    rows = report.tables(report.load_records(tmp_path))["table4"]
    mine = _by(rows, "roberta-base", "LoReFT")
    assert mine["sst2"]["mean"] == pytest.approx(92.0) and mine["sst2"]["paper"] == 93.4
    assert all(mine[t]["mean"] is None and mine[t]["paper"] is not None for t in GLUE if t != "sst2")
    assert mine["avg"]["mean"] is None and mine["avg"]["paper"] == pytest.approx(84.2125)


def test_out_dir_writes_markdown_csv_latex_and_the_figure(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs, "a", _table_run("table2", "loreft", "loreft", "llama-7b", "math", 42,
                                 by_task={"aqua": 0.2, "gsm8k": 0.3, "mawps": 0.7, "svamp": 0.5}))
    _write(runs, "b", _record("none", 42, 0.1, task="obqa"))  # a run of no table
    out = tmp_path / "out"
    assert report.main([str(runs), "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.md", "results.png", "results.tex",
                                                     "table2.csv", "table2.md", "table2.png", "table2.tex"]
    tex = (out / "table2.tex").read_text()  # a header, then the paper's 2 models x 5 rows x (4 tasks + avg)
    long, paper_layout = tex.split("\n\n")
    assert long.count(r"\\") == 1 + 2 * 5 * 5 and r"\toprule" in long and "LoReFT & aqua & 20.0" in long
    assert paper_layout.count(r"\\") == 1 + 2 * 5  # a header, then a row per model and method
    assert "llama-7b & LoReFT & 0.031 & 20.0 (21.4) & 30.0 (26.0) & 70.0 (76.2) & 50.0 (46.8) & 42.5 (42.6)" in tex
    assert (out / "table2.png").read_bytes()[:4] == b"\x89PNG"
    assert "## table2" in capsys.readouterr().out


def test_figure_panels_use_the_average_where_the_table_has_one():
    from reftbench.report.figure import panels
    rows = [{"model": "m", "task": t, "method": "x", "mean": 1.0, "paper": None, "params_percent": 0.1}
            for t in ("a", "b", "avg")] + [{"model": "k", "task": "c", "method": "x", "mean": 1.0, "paper": None,
                                           "params_percent": 0.1}]
    assert sorted(panels(rows)) == [("k", "c"), ("m", "avg")]


def test_unknown_table_is_one_line_and_exit_2(tmp_path, capsys):
    _write(tmp_path, "a", _record("loreft", 42, 0.5))
    assert report.main([str(tmp_path), "--table", "table9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "table9" in err


def test_other_training_data_is_not_the_papers_row_but_the_papers_own_file_is(tmp_path):
    """task.files.train= naming another file (or the paper's file name holding other data) makes a
    variant; naming a file whose checksum is the paper's keeps the paper's row."""
    from reftbench.tasks.loaders import fingerprint
    paper_file, other_file = tmp_path / "paper.json", tmp_path / "other.json"
    paper_file.write_text("[]"), other_file.write_text("[{}]")
    sums = {"train": "git-sha1:" + fingerprint(paper_file)["git_sha1"]}

    def run_on(name, path, acc, override=True):
        rec = _table_run("table1", "loreft", "loreft", "llama-7b", "commonsense", 42, by_task={t: acc for t in CS},
                         overrides=[f"task.files.train={path}"] if override else ["task.data_dir=/data"])
        rec["config"]["task"] = {"name": "commonsense", "checksums": sums}
        rec["data"] = {"files": {"train": [fingerprint(path)]}}
        _write(tmp_path, name, rec)

    run_on("paper", paper_file, 0.7)
    run_on("other", other_file, 0.5)
    rows = report.tables(report.load_records(tmp_path))["table1"]
    assert _by(rows, "llama-7b", "LoReFT")["boolq"]["mean"] == pytest.approx(70.0)
    variant = [r for r in rows if r["model"] == "llama-7b" and r["method"].startswith("loreft")]
    assert variant and all(r["paper"] is None for r in variant)
    assert [r["mean"] for r in variant if r["task"] == "boolq"] == [pytest.approx(50.0)]
    # a data_dir whose train file is not the paper's (same name, other bytes) is not the paper's row either
    for d in tmp_path.iterdir():
        if d.is_dir():
            import shutil
            shutil.rmtree(d)
    run_on("dir", other_file, 0.4, override=False)
    rows = report.tables(report.load_records(tmp_path))["table1"]
    assert _by(rows, "llama-7b", "LoReFT")["boolq"]["mean"] is None
