"""reftbench-report: one markdown table from result.json files."""
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
    lines = text.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_mean_and_sample_std_over_seeds(tmp_path, capsys):
    # loreft: 0.50, 0.60, 0.70 -> mean 60.0, sample std sqrt(((-10)² + 0 + 10²) / 2) = 10.0
    for seed, acc, sec, rss in [(42, 0.5, 60, 1.0), (43, 0.6, 90, 2.5), (44, 0.7, 120, 2.0)]:
        _write(tmp_path / "multirun", f"loreft{seed}", _record("loreft", seed, acc, seconds=sec, rss=rss))
    # lora: 0.40 and 0.45 -> mean 42.5, sample std sqrt(2 · 2.5²) = 3.5355... -> 3.5
    for seed, acc in [(42, 0.40), (43, 0.45)]:
        _write(tmp_path, f"lora{seed}", _record("lora", seed, acc, frozen=0.2, trainable=56_098_816, percent=0.82563))
    out = tmp_path / "out" / "table.md"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    rows = {r["method"]: r for r in _rows(printed)}
    assert set(rows) == {"loreft", "lora"}
    assert rows["loreft"]["score"] == "60.0 ± 10.0 (3 seeds)"
    assert rows["loreft"]["frozen"] == "25.0 ± 0.0 (3 seeds)"
    assert rows["loreft"]["train time"] == "1m 30s"  # mean of 60, 90, 120 s
    assert rows["loreft"]["peak memory"] == "2.50 GiB RSS"  # the largest peak
    assert rows["lora"]["score"] == "42.5 ± 3.5 (2 seeds)"
    assert rows["lora"]["trainable params"] == "56,098,816"
    assert rows["lora"]["% params"] == "0.8256%"
    assert rows["lora"]["task"] == "chain-sum" and rows["lora"]["model"] == "tiny"


def test_single_run_and_score_key(tmp_path, capsys):
    _write(tmp_path, "a", _record("red", 42, 0.812, key="score", seconds=7, rss=0.3))
    assert report.main([str(tmp_path)]) == 0
    (row,) = _rows(capsys.readouterr().out)
    assert row["score"] == "81.2"
    assert row["train time"] == "7s" and row["peak memory"] == "0.30 GiB RSS"


def test_different_options_are_different_rows(tmp_path, capsys):
    _write(tmp_path, "r4", _record("loreft", 42, 0.5, rank=4))
    _write(tmp_path, "r8a", _record("loreft", 42, 0.6, rank=8))
    _write(tmp_path, "r8b", _record("loreft", 43, 0.8, rank=8))
    _write(tmp_path, "other", _record("loreft", 42, 0.9, task="word-reversal"))
    assert report.main([str(tmp_path)]) == 0
    rows = {(r["task"], r["method"]): r["score"] for r in _rows(capsys.readouterr().out)}
    assert rows == {("chain-sum", "loreft (intervention.rank=4)"): "50.0",
                    ("chain-sum", "loreft (intervention.rank=8)"): "70.0 ± 14.1 (2 seeds)",
                    ("word-reversal", "loreft"): "90.0"}


def test_alpaca_eval_runs_have_no_score(tmp_path, capsys):
    rec = _record("loreft", 42, 0.5, task="alpaca")
    rec["metrics"] = {"trained": {"alpaca_eval_outputs": "x.json", "n": 805}}
    _write(tmp_path, "a", rec)
    assert report.main([str(tmp_path)]) == 0
    (row,) = _rows(capsys.readouterr().out)
    assert row["score"] == "1 run(s), judged offline" and row["frozen"] == "–"


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
    rows = {r["method"]: r["score"] for r in _rows(report.table(report.load_records(tmp_path)))}
    assert rows == {"loreft (task.train_limit=1000)": "70.0", "loreft (task.train_limit=2000)": "60.0"}
