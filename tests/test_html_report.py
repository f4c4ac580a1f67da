"""`reftbench-report DIR --html OUT.html`: one self-contained page, checked in a real headless browser
(Debian's chromium through Selenium): it loads with no console errors and no network, a click on a
column header sorts the table, strings from result files cannot inject script, and a screenshot is saved."""
import json
import re
import shutil
from pathlib import Path

import pytest

from reftbench import report
from reftbench.report.html import rows_from_csv

CS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa"]
EVIL = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"


def _record(method, seed, score, model="llama-7b", task="commonsense", table="table1", row=None, by_task=None,
            trainable=2_097_408, percent=0.031, samples=()):
    rec = {
        "method": method, "task": task, "model": model, "seed": seed,
        "metrics": {"frozen": {"score": 0.2, "n": 100}, "trained": {"score": score, "n": 100}},
        "params": {"trainable": trainable, "base": 6_738_415_616, "percent": percent},
        "train": {"steps": 10, "train_seconds": 90.0}, "memory": {"cpu_peak_rss_gib": 1.5},
        "samples": list(samples),
        "config": {"seed": seed, "table": table, "row": row or method,
                   "intervention": {"name": method, "rank": 8}, "trainer": {"lr": 4e-3}},
        "overrides": [f"experiment={table}_{row or method}_llama7b", f"seed={seed}"],
    }
    if by_task:
        rec["metrics"]["trained"]["by_task"] = {t: {"score": v, "n": 100} for t, v in by_task.items()}
    return rec


def _runs(root: Path, evil: bool = False) -> Path:
    recs = [_record("loreft", s, 0.8, by_task={t: 0.7 + 0.01 * i + 0.002 * (s - 42) for i, t in enumerate(CS)})
            for s in (42, 43)]
    recs.append(_record("lora", 42, 0.75, trainable=56_098_816, percent=0.826,
                        by_task={t: 0.6 + 0.02 * i for i, t in enumerate(CS)}))
    recs.append(_record("none", 42, 0.3, trainable=0, percent=0.0, table=None, task="boolq"))
    if evil:  # every string a result file can carry
        recs.append(_record("loreft", 42, 0.5, model=EVIL, task=EVIL, table=None, row=EVIL,
                            samples=[{"prompt": EVIL, "output": "</script><script>window.__pwned = 3</script>"}]))
        recs[-1]["config"]["intervention"]["rank"] = EVIL
        recs[-1]["overrides"] = [f"intervention.rank={EVIL}"]
    for i, r in enumerate(recs):
        path = root / f"run{i}" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(r))
    return root


def test_page_is_self_contained_and_escapes_result_strings(tmp_path):
    out = tmp_path / "page.html"
    assert report.main([str(_runs(tmp_path / "runs", evil=True)), "--html", str(out)]) == 0
    page = out.read_text()
    # nothing from a result file opens a tag: the only <script> tags are plotly's and ours
    assert "<script>window.__pwned" not in page and "<img src=x" not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page  # shown as text
    assert not re.search(r"<(script|link|img)[^>]+src=[\"']?https?:", page)  # nothing fetched
    assert "Content-Security-Policy" in page and "connect-src 'none'" in page
    assert page.count("plotly.js v") >= 1 and len(page) > 1_000_000  # plotly inlined, once
    for t in CS:
        assert f"<th scope=col>{t}</th>" in page  # the per-task breakdown
    assert "<span class=paper>(" in page  # the paper's numbers beside ours (table1 rows)


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (`make test` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1366,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_page_in_a_headless_browser(tmp_path):
    from selenium.webdriver.common.by import By
    out = tmp_path / "page.html"
    assert report.main([str(_runs(tmp_path / "runs", evil=True)), "--html", str(out)]) == 0
    browser = _browser()
    try:
        browser.get(out.as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        assert browser.execute_script("return window.__pwned") is None  # no injected script ran
        assert browser.execute_script("return typeof Plotly") == "object"
        assert len(browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) >= 1

        # Figure 1: hover text names the run; a click on a method in the legend hides its points
        plot = "document.querySelectorAll('.js-plotly-plot')[1]"  # table1's figure
        hovers = browser.execute_script(f"return {plot}.data.map(t => (t.hovertext || []).join(' '))")
        assert any("LoReFT" in h and "llama-7b" in h and "2 seed" in h for h in hovers)
        entry = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[1].find_elements(
            By.CSS_SELECTOR, ".legend .traces")[0]
        name = entry.text
        entry.find_element(By.CSS_SELECTOR, ".legendtoggle").click()
        from selenium.webdriver.support.ui import WebDriverWait  # plotly waits out a possible double click
        hidden = WebDriverWait(browser, 5).until(lambda b: b.execute_script(
            f"return {plot}.data.filter(t => t.visible === 'legendonly').map(t => t.name)"))
        assert hidden and all(h.startswith(name.split(" (")[0]) for h in hidden)

        # the results table of table1: click "score" to sort ascending, again for descending
        table = browser.find_element(By.ID, "results-1")  # tables in name order: results, table1
        header = [th.text.strip(" ↕▲▼") for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        col = header.index("score")

        def scores():
            cells = [r.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-sort")
                     for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
            return [float(c) for c in cells if c]
        before = scores()
        table.find_elements(By.CSS_SELECTOR, "thead th")[col].click()
        up = scores()
        table.find_elements(By.CSS_SELECTOR, "thead th")[col].click()
        down = scores()
        assert up == sorted(before) and down == sorted(before, reverse=True) and up != before

        # filtering hides the rows that do not match
        box = browser.find_element(By.CSS_SELECTOR, f"input[data-table={table.get_attribute('id')}]")
        box.send_keys("lora")
        visible = [r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr") if r.is_displayed()]
        assert visible and all("lora" in r.text.lower() for r in visible)
        assert len(visible) < len(table.find_elements(By.CSS_SELECTOR, "tbody tr"))
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
    finally:
        browser.quit()


def test_a_folder_of_tables_only_renders_from_its_csv(tmp_path, capsys):
    """results/mini keeps the tables, not the runs: the page is drawn from <table>.csv."""
    runs, tables = _runs(tmp_path / "runs"), tmp_path / "tables"
    assert report.main([str(runs), "--out-dir", str(tables), "--no-figure"]) == 0
    for f in tables.iterdir():
        if f.suffix != ".csv":
            f.unlink()
    out = tmp_path / "page.html"
    assert report.main([str(tables), "--html", str(out)]) == 0
    assert "CSV files (no per-run details)" in capsys.readouterr().err
    page = out.read_text()
    assert "<h2>table1</h2>" in page and "Runs (" not in page
    for row in report.tables(report.load_records(runs))["table1"]:
        if row["mean"] is not None and row["task"] != "avg":
            assert f'data-sort="{row["mean"]!r}"' in page or f"{row['mean']:.1f}" in page
    assert report.main([str(tmp_path / "empty-dir-not-here"), "--html", str(out)]) == 2


def _with_per_example(root: Path) -> Path:
    """Two methods scored on the same 100 examples per set, loreft right on 70% then 74%, lora on 40% then 42%."""
    ids = " ".join(f"{i:012x}" for i in range(100))
    for i, (method, right) in enumerate((("loreft", 70), ("lora", 40), ("loreft", 74), ("lora", 42))):
        rec = _record(method, 42 + i // 2, right / 100, table=None, task="commonsense",
                      by_task={t: right / 100 for t in CS[:2]})
        rec["metrics"]["trained"]["per_example"] = {"by_task": {t: {"ids": ids, "correct": "1" * right + "0" * (100 - right)}
                                                            for t in CS[:2]}}
        path = root / f"run{i}" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(rec))
    return root


def test_page_shows_intervals_error_bars_and_the_paired_test(tmp_path):
    runs, out = _with_per_example(tmp_path / "runs"), tmp_path / "page.html"
    assert report.main([str(runs), "--html", str(out), "--out-dir", str(tmp_path / "tables")]) == 0
    page = out.read_text()
    assert "<th scope=col>Δ vs loreft [95% CI], p</th>" in page and "Mean ± 95% CI over seeds" in page
    assert re.search(r'<td data-sort="-3[01]\.\d*">-31\.0 \[-\d+\.\d, -\d+\.\d\], p≤0\.002</td>', page)
    assert "paired bootstrap over test examples" in page
    assert '"error_y":{"array":[12.706' in page  # lora's average: 40, 42 -> t(0.975, 1) · √2 / √2
    # from the CSV alone the page shows the same column
    for f in (tmp_path / "tables").iterdir():
        if f.suffix != ".csv":
            f.unlink()
    assert report.main([str(tmp_path / "tables"), "--html", str(out)]) == 0
    assert "<th scope=col>Δ vs loreft [95% CI], p</th>" in out.read_text()


def test_a_csv_from_before_the_intervals_shows_them_from_its_std():
    old = "model,method,task,mean,std,n\ntiny,loreft,obqa,60.0,10.0,3\ntiny,lora,obqa,50.0,,1\n"
    rows = {r["method"]: r for r in rows_from_csv(old)}
    assert rows["loreft"]["ci95"] == pytest.approx(24.84, abs=0.01) and rows["lora"]["ci95"] is None  # 4.303 · 10 / √3
