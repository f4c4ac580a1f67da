"""Statistics in the report: intervals over seeds, the paired test over examples, per-example scores in result.json."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from scipy import stats as sps

from reftbench import report
from reftbench.evaluate import example_id
from reftbench.report import stats
from reftbench.report.html import rows_from_csv

ROOT = Path(__file__).resolve().parents[1]


def test_t_interval_is_scipys_and_one_seed_has_none():
    values = [61.0, 64.5, 58.2, 63.3]
    lo, hi = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert stats.t_interval(values) == pytest.approx((hi - lo) / 2)
    assert stats.t_interval([70.0]) is None


def _correct(n, rate, seed):
    """n answers, a share `rate` of them right, at random places."""
    c = np.zeros(n, dtype=np.uint8)
    c[np.random.default_rng(seed).permutation(n)[: round(rate * n)]] = 1
    return c


def _stratum(correct, ids=None):
    ids = ids or [f"{i:012x}" for i in range(len(correct))]
    return stats.Stratum(ids, "accuracy", correct=np.asarray(correct, dtype=np.uint8))


def test_paired_test_finds_a_real_difference_and_calls_equal_methods_not_significant():
    a, b = _stratum(_correct(200, 0.8, 1)), _stratum(_correct(200, 0.5, 2))
    t = stats.paired_test([(a, b)])
    assert t.delta == pytest.approx(30.0) and t.low > 0 and t.p < 0.01 and t.significant
    assert "n.s." not in stats.paired_text(t) and stats.paired_text(t).startswith("+30.0 [")
    same = stats.paired_test([(a, a)])
    assert same.delta == 0 and same.p == 1 and not same.significant
    assert stats.paired_text(same).endswith("p=1.00 n.s.")
    # two methods right equally often, on different examples: no evidence either way
    c, d = _stratum(_correct(200, 0.6, 3)), _stratum(_correct(200, 0.6, 4))
    t2 = stats.paired_test([(c, d)])
    assert t2.delta == 0 and t2.p > 0.05 and t2.low < 0 < t2.high and "n.s." in stats.paired_text(t2)


def test_paired_test_is_deterministic_and_pools_seeds():
    pairs = [(_stratum(_correct(100, 0.7, s)), _stratum(_correct(100, 0.6, s + 10))) for s in range(3)]
    first, again = stats.paired_test(pairs), stats.paired_test(pairs)
    assert (first.delta, first.low, first.high, first.p) == (again.delta, again.low, again.high, again.p)
    assert first.delta == pytest.approx(10.0) and first.pairs == 3 and first.examples == 300
    # pooled over three seeds the interval is narrower than one seed's
    one = stats.paired_test(pairs[:1])
    assert first.high - first.low < one.high - one.low


def test_non_decomposable_metrics_are_recomputed_on_each_resample():
    from sklearn.metrics import matthews_corrcoef
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    good = np.where(rng.random(300) < 0.85, labels, 1 - labels)
    bad = np.where(rng.random(300) < 0.6, labels, 1 - labels)
    ids = [f"{i:012x}" for i in range(300)]
    mk = lambda p: stats.Stratum(ids, "matthews_correlation", prediction=p.astype(float), label=labels.astype(float),  # noqa: E731
                                 glue_task="cola")
    t = stats.paired_test([(mk(good), mk(bad))])
    assert t.delta == pytest.approx(100 * (matthews_corrcoef(labels, good) - matthews_corrcoef(labels, bad)))
    assert t.low < t.delta < t.high and t.p < 0.01
    # STS-B: Pearson's r of a close and a noisy regression
    gold = rng.uniform(0, 5, 300)
    close, noisy = gold + rng.normal(0, 0.5, 300), gold + rng.normal(0, 3, 300)
    mk = lambda p: stats.Stratum(ids, "pearson", prediction=p, label=gold, glue_task="stsb")  # noqa: E731
    t = stats.paired_test([(mk(close), mk(noisy))])
    assert t.delta == pytest.approx(100 * (sps.pearsonr(close, gold)[0] - sps.pearsonr(noisy, gold)[0]))
    assert t.low > 0 and t.significant


def test_runs_on_different_examples_are_not_paired():
    a = {("obqa", 42): _stratum([1, 0, 1], ["a", "b", "c"])}
    b = {("obqa", 42): _stratum([1, 1, 1], ["a", "c", "b"])}  # same examples, another order
    pairs, note = stats.match(a, b)
    assert pairs == [] and "different examples" in note
    assert stats.match(a, {("obqa", 42): None})[1] == "1 run pair(s) without per-example scores"
    assert stats.match(a, {("obqa", 43): a[("obqa", 42)]})[1] == "no seed in common"
    assert stats.paired_test([]).p is None


# --- the report, end to end ---------------------------------------------------------------------

def _per_example(correct, ids=None):
    ids = ids or [example_id({"i": i}) for i in range(len(correct))]
    return {"ids": " ".join(ids), "correct": "".join(str(int(c)) for c in correct)}


def _record(method, seed, correct, per_example=True, ids=None, tuned=None):
    trained = {"accuracy": float(np.mean(correct)), "score": float(np.mean(correct)), "n": len(correct)}
    if per_example:
        trained["per_example"] = _per_example(correct, ids)
    cfg = {"seed": seed, "intervention": {"name": method}, "trainer": {"lr": 1e-3}}
    if tuned:
        cfg["tuned"] = tuned
    return {"method": method, "task": "obqa", "model": "tiny", "seed": seed, "metrics": {"trained": trained},
            "params": {"trainable": 10, "percent": 0.1}, "config": cfg}


def _write(root, name, record):
    path = root / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))


def _table(text):
    lines = text.strip().split("\n\n")[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, {r["method"]: r for r in (dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
                                             for line in lines[2:])}


def _three_methods(root, n=200):
    for seed in (42, 43):
        _write(root, f"loreft{seed}", _record("loreft", seed, _correct(n, 0.8, seed)))
        _write(root, f"lora{seed}", _record("lora", seed, _correct(n, 0.5, seed + 1)))
        _write(root, f"red{seed}", _record("red", seed, _correct(n, 0.8, seed)))  # loreft's answers exactly


def test_report_prints_intervals_and_the_paired_test_column(tmp_path, capsys):
    _three_methods(tmp_path)
    assert report.main([str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    header, rows = _table(printed)
    col = "Δ vs loreft [95% CI], p"
    assert col in header
    assert rows["loreft"][col] == "reference"
    assert rows["lora"][col].startswith("-30.0 [") and rows["lora"][col].endswith("p≤0.002") and "n.s." not in rows["lora"][col]
    assert rows["red"][col] == "+0.0 [+0.0, +0.0], p=1.00 n.s."
    assert rows["loreft"]["score"] == "80.0 ± 0.0" and rows["lora"]["score"].startswith("50.0 ± ")
    assert "95% CI over seeds" in printed and "paired bootstrap" in printed and "1000 resamples" in printed
    # CSV keeps the numbers; the page reads them back and shows the same column
    csv_rows = {r["method"]: r for r in rows_from_csv((tmp_path / "out" / "results.csv").read_text())}
    assert csv_rows["lora"]["p"] < 0.01 and csv_rows["lora"]["reference"] == "loreft"
    assert csv_rows["lora"]["delta"] == pytest.approx(-30.0) and csv_rows["loreft"]["ci95"] == 0
    _, again = _table(report.markdown(list(csv_rows.values())))
    assert again["lora"][col] == rows["lora"][col]
    tex = (tmp_path / "out" / "results.tex").read_text()
    assert r"$\Delta$ vs loreft [95\% CI], p" in tex and r"\footnotesize Score: mean over seeds" in tex


def test_reference_option_and_an_unknown_reference(tmp_path, capsys):
    _three_methods(tmp_path)
    assert report.main([str(tmp_path), "--reference", "lora"]) == 0
    header, rows = _table(capsys.readouterr().out)
    assert rows["lora"]["Δ vs lora [95% CI], p"] == "reference"
    assert rows["loreft"]["Δ vs lora [95% CI], p"].startswith("+30.0 [")
    _write(tmp_path, "dora42", _record("dora", 42, [1, 0], per_example=False) | {"task": "piqa"})
    assert report.main([str(tmp_path), "--reference", "lora"]) == 0
    assert "No run of the reference in: tiny / piqa." in capsys.readouterr().out
    assert report.main([str(tmp_path), "--reference", "dora"]) == 0  # dora's column has it, obqa's not
    assert "No run of the reference in: tiny / obqa." in capsys.readouterr().out
    assert report.main([str(tmp_path), "--reference", "vera"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--reference vera" in err


def test_without_loreft_the_first_method_is_the_reference(tmp_path, capsys):
    for seed in (42, 43):
        _write(tmp_path, f"lora{seed}", _record("lora", seed, _correct(50, 0.5, seed)))
        _write(tmp_path, f"none{seed}", _record("none", seed, _correct(50, 0.2, seed)))
    assert report.main([str(tmp_path)]) == 0
    header, rows = _table(capsys.readouterr().out)
    assert "Δ vs none [95% CI], p" in header and rows["none"]["Δ vs none [95% CI], p"] == "reference"


def test_records_without_per_example_scores_still_render(tmp_path, capsys):
    for seed in (42, 43):
        _write(tmp_path, f"loreft{seed}", _record("loreft", seed, _correct(40, 0.8, seed), per_example=False))
        _write(tmp_path, f"lora{seed}", _record("lora", seed, _correct(40, 0.5, seed), per_example=False))
    _write(tmp_path, "red42", _record("red", 42, [1] * 40))  # one seed: no interval
    assert report.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    header, rows = _table(printed)
    assert not any(h.startswith("Δ vs") for h in header)
    assert rows["loreft"]["score"].startswith("80.0 ± ") and rows["red"]["score"] == "100.0"
    assert "No paired test" in printed and "a cell of one seed has no interval" in printed


def test_runs_on_different_examples_render_with_a_note(tmp_path, capsys):
    for seed in (42, 43):
        _write(tmp_path, f"loreft{seed}", _record("loreft", seed, _correct(60, 0.8, seed)))
        _write(tmp_path, f"lora{seed}", _record("lora", seed, _correct(60, 0.5, seed)))
        other = [example_id({"other": i}) for i in range(60)]
        _write(tmp_path, f"red{seed}", _record("red", seed, _correct(60, 0.5, seed), ids=other))
    _write(tmp_path, "dora42", _record("dora", 42, _correct(60, 0.5, 1), per_example=False))
    assert report.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    _, rows = _table(printed)
    col = "Δ vs loreft [95% CI], p"
    assert rows["red"][col] == "–" and rows["dora"][col] == "–" and "p" in rows["lora"][col]
    assert "red / obqa: 2 run pair(s) scored on different examples, not paired" in printed
    assert "dora / obqa: 1 run pair(s) without per-example scores" in printed


def test_the_tuning_budget_is_under_the_table(tmp_path, capsys):
    tuned = {"trials": 20, "max_steps": 300, "dev_size": 500, "metric": "accuracy", "study": "s.db"}
    for seed in (42, 43):
        _write(tmp_path, f"loreft{seed}", _record("loreft", seed, _correct(50, 0.8, seed), tuned=tuned))
        _write(tmp_path, f"lora{seed}", _record("lora", seed, _correct(50, 0.5, seed)))
    assert report.main([str(tmp_path)]) == 0
    assert "Tuned on a dev split: loreft: 20 trials × 300 steps, dev split 500 examples, by accuracy." in \
        capsys.readouterr().out


def test_average_rows_pool_their_sets():
    sets = ("aqua", "gsm8k")
    recs = []
    for method, rate in (("loreft", 0.7), ("lora", 0.3)):
        for seed in (42, 43):
            r = _record(method, seed, [1])
            r["task"], r["metrics"]["trained"] = "math", {
                "by_task": {t: {"accuracy": rate} for t in sets}, "accuracy": rate,
                "per_example": {"by_task": {t: _per_example(_correct(100, rate, seed + k)) for k, t in enumerate(sets)}}}
            recs.append(r)
    rows = {(r["method"], r["task"]): r for r in report.tables(recs)["results"]}
    avg = rows[("lora", "avg")]
    assert avg["delta"] == pytest.approx(-40.0) and avg["p"] < 0.01 and rows[("lora", "aqua")]["test"].pairs == 2
    assert avg["test"].pairs == 4 and rows[("loreft", "avg")]["ci95"] == 0


# --- per-example scores in result.json ----------------------------------------------------------

def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_a_generation_run_records_per_example_scores(tmp_path):
    from reftbench.run import run
    from reftbench.tasks import build
    cfg = _compose("model=tiny-random-llama", "trainer.max_steps=2", "task.train_limit=8", "task.eval_limit=6",
                   "trainer.batch_size=4", "eval_batch_size=8", "intervention.rank=2",
                   f"hydra.run.dir={tmp_path}")
    rec = run(cfg, tmp_path)
    assert json.loads((tmp_path / "result.json").read_text())["metrics"] == rec["metrics"]
    test = build(cfg.task).load_splits(int(cfg.seed))["test"]
    for which in ("trained", "frozen"):
        m = rec["metrics"][which]
        s = stats.stratum(m)
        assert len(s.ids) == len(s.correct) == m["n"] == 6
        assert s.ids == [example_id(r) for r in test][:6]
        assert s.correct.mean() == pytest.approx(m["accuracy"])


def test_a_several_set_run_records_per_example_scores_per_set(tmp_path):
    from reftbench.run import run
    fixtures = ROOT / "tests" / "fixtures" / "llm-adapters"
    cfg = _compose("model=tiny-random-llama", "task=commonsense", f"task.data_dir={fixtures}", "task.eval_limit=2",
                   "task.max_new_tokens=4", "trainer.max_steps=1", "trainer.batch_size=4", "intervention.rank=2",
                   "eval_frozen=false")
    rec = run(cfg, tmp_path)
    m = rec["metrics"]["trained"]
    assert len(m["by_task"]) == 8 and set(m["per_example"]["by_task"]) == set(m["by_task"])
    for name, v in m["by_task"].items():
        s = stats.stratum(m, name)
        assert len(s.ids) == v["n"] and s.correct.mean() == pytest.approx(v["accuracy"])


def test_a_classification_run_records_predictions_and_labels(tmp_path):
    from reftbench.run import run
    from reftbench.tasks import glue_metrics
    fixtures = ROOT / "tests" / "fixtures" / "glue" / "SST-2"
    cfg = _compose("model=tiny-random-bert", "task=sst2", f"task.data_dir={fixtures}", "trainer.epochs=1",
                   "trainer.batch_size=4", "intervention.positions=f1", "intervention.rank=2")
    rec = run(cfg, tmp_path)
    m = rec["metrics"]["trained"]
    pe = m["per_example"]
    preds, labels = pe["prediction"].split(), pe["label"].split()
    assert len(pe["ids"].split()) == len(preds) == len(labels) == len(pe["correct"]) == m["n"]
    assert glue_metrics("sst2", [int(p) for p in preds], [int(x) for x in labels])["accuracy"] == m["accuracy"]
    assert pe["correct"] == "".join(str(int(p == x)) for p, x in zip(preds, labels))
    assert not math.isnan(m["score"])


def test_runs_scored_on_the_dev_split_stay_out_of_the_table(tmp_path, capsys):
    """A tuning folder holds trials scored on dev beside the final runs: only test scores are tabled."""
    _three_methods(tmp_path)
    trial = _record("loreft", 42, _correct(100, 0.1, 7))
    trial["data"] = {"eval_split": "dev", "dev_size": 100}
    trial["config"]["trainer"]["lr"] = 5e-2  # other options: it would be a row of its own
    _write(tmp_path, "trials/loreft/0", trial)
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr()
    _, rows = _table(out.out)
    assert set(rows) == {"loreft", "lora", "red"} and "left out 1 run(s) scored on the dev split" in out.err
