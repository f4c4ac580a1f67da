"""The FineGates sparsity-sweep report: rows per target sparsity from result.json files, table, plot, page."""
import json

import pytest

from reftbench.report import sparsity


def record(s, seed, score, gated, linear, speed=None):
    return {"model": "minilm-l6", "task": "sst2", "seed": seed,
            "config": {"intervention": {"name": "finegates", "target_sparsity": s}},
            "metrics": {"trained": {"score": score}}, "train": {"selection_score": score - 0.01},
            "method_report": {"sparsity_gated": gated, "sparsity_cascade_linear": linear},
            "compressed": {"params_dense": 100, "params_removed_total": int(100 * linear / 2),
                           "timing": {"speedup": speed} if speed else {}}}


def write(tmp_path, recs, bench=None):
    for i, r in enumerate(recs):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "result.json").write_text(json.dumps(r))
        if bench is not None:
            (d / "bench.json").write_text(json.dumps({"speedup": bench[i]}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "result.json").write_text(json.dumps({"config": {"intervention": {"name": "lora"}}}))


def test_rows_average_seeds_and_prefer_the_benchmark(tmp_path):
    recs = [record(0.0, 42, 0.80, 0.0, 0.0, 1.0), record(0.0, 43, 0.78, 0.0, 0.0, 1.02),
            record(0.3, 42, 0.77, 0.30, 0.33, 0.9), record(0.3, 43, 0.75, 0.31, 0.35, 1.1)]
    write(tmp_path, recs, bench=[1.0, 1.0, 1.3, 1.5])
    table = sparsity.rows(sparsity.load(tmp_path))
    assert [r["target"] for r in table] == [0.0, 0.3]  # the LoRA run is not FineGates
    r = table[1]
    assert r["n"] == 2 and r["score"] == pytest.approx(0.76) and r["score_std"] == pytest.approx(0.01414, abs=1e-4)
    assert r["removed_gated"] == pytest.approx(0.305) and r["removed_linear"] == pytest.approx(0.34)
    assert r["speedup"] == pytest.approx(1.4) and r["speedup_source"] == "bench"
    md = sparsity.markdown(table)
    assert "| minilm-l6 | sst2 | 0.3 | 2 | 76.0 ± 1.4 |" in md and "1.40× (bench)" in md


def test_without_benchmarks_the_runs_timing_is_used_and_files_are_written(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    write(runs, [record(0.1, 42, 0.8, 0.1, 0.12, 1.2)])
    out = tmp_path / "out"
    assert sparsity.main([str(runs), "--out-dir", str(out)]) == 0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "1.20× (run)" in (out / "sweep.md").read_text()
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("model,task,target")
    html = sparsity.section(sparsity.load(runs))
    assert "data:image/png;base64," in html and "<td>0.1</td>" in html
    assert sparsity.section([]) == "" and sparsity.main([str(tmp_path / "nothing")]) == 2
