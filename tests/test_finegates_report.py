"""The report's sparsity and speed-up columns: shown for methods that remove weights, measured, never the target."""
import csv
import io

from test_report import _record, _rows, _write
from reftbench import report


def _finegates(seed, score, removed, dense, speedup):
    r = _record("finegates", seed, score)
    r["method_report"] = {"sparsity_cascade_model": 0.99, "sparsity_cascade_linear": removed / dense * 2, "closed_rows": 5}
    r["compressed"] = {"params_dense": dense, "params_removed_total": removed,
                       "timing": {"speedup": speedup}}
    r["config"]["intervention"]["target_sparsity"] = 0.4
    return r


def test_removed_share_and_speedup_are_the_means_over_seeds(tmp_path):
    _write(tmp_path, "a", _finegates(42, 0.7, 20_000, 200_000, 1.2))
    _write(tmp_path, "b", _finegates(43, 0.8, 30_000, 200_000, 1.4))
    _write(tmp_path, "c", _record("loreft", 42, 0.6))
    table = report.tables(report.load_records(tmp_path))["results"]
    rows = {r["method"]: r for r in _rows(report.markdown(table))}
    assert rows["finegates"]["removed (model)"] == "12.5%" and rows["finegates"]["speed-up"] == "1.30×"
    # the share of the non-embedding Linear weights (the ones that cost compute) beside the model's
    assert rows["finegates"]["removed (Linear)"] == "25.0%"
    assert rows["loreft"]["removed (model)"] == "–" and rows["loreft"]["removed (Linear)"] == "–"
    parsed = {r["method"]: r for r in csv.DictReader(io.StringIO(report.to_csv(table)))}
    assert float(parsed["finegates"]["sparsity"]) == 12.5 and parsed["loreft"]["sparsity"] == ""
    assert float(parsed["finegates"]["sparsity_linear"]) == 25.0


def test_without_a_checkpoint_the_gates_cascade_count_is_shown(tmp_path):
    r = _finegates(42, 0.7, 0, 1, 1.0)
    del r["compressed"]
    r["method_report"]["sparsity_cascade_model"] = 0.25
    _write(tmp_path, "a", r)
    rows = _rows(report.markdown(report.tables(report.load_records(tmp_path))["results"]))
    assert rows[0]["removed (model)"] == "25.0%" and rows[0]["speed-up"] == "–"


def test_tables_of_methods_that_remove_nothing_have_no_such_columns(tmp_path):
    _write(tmp_path, "c", _record("loreft", 42, 0.6))
    rows = _rows(report.markdown(report.tables(report.load_records(tmp_path))["results"]))
    assert not any(k.startswith("removed") for k in rows[0]) and "speed-up" not in rows[0]
