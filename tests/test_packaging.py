"""reftbench as an installed package: a wheel in a fresh virtual environment (no editable path, no
checkout on sys.path) starts, runs, and composes a user's own config folder with the shipped one."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["trainer.max_steps=2", "task.train_limit=8", "task.eval_limit=4", "trainer.batch_size=4", "eval_batch_size=4"]


def _run(cmd, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A wheel built from a copy of the sources, installed with --no-deps into a new venv that sees
    this venv's dependencies through a plain path line (so nothing is downloaded, and the editable
    install's own .pth file here is not processed)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", src)
    wheels = tmp / "wheels"
    res = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src], tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(wheels.glob("reftbench-*.whl"))
    env = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", env], tmp).returncode == 0
    py = env / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    where = _run([py, "-c", "import reftbench; print(reftbench.__file__)"], tmp).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel, not the checkout
    outside = tmp / "elsewhere"
    outside.mkdir()
    return env, outside


def test_wheel_ships_the_configs_and_starts_outside_the_checkout(venv):
    env, outside = venv
    res = _run([env / "bin" / "reftbench", "dry_run=true", "model=llama-7b", "intervention.rank=8"], outside)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2,097,408 trainable" in res.stdout
    res = _run([env / "bin" / "reftbench", "intervention.rnak=3"], outside)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "intervention.rnak is not an option" in res.stderr
    res = _run([env / "bin" / "reftbench-export", outside / "no-run", "--out", outside / "x"], outside)
    assert res.returncode == 2 and "is not a folder" in res.stderr and "Traceback" not in res.stderr


def _user_folder(tmp: Path) -> Path:
    """A user's config folder: a local model (a tiny random Llama saved to disk) and a local JSON task."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_llama
    tmp.mkdir(parents=True, exist_ok=True)
    loaded = tiny_llama(layers=2)
    loaded.model.save_pretrained(tmp / "my-model")
    loaded.tokenizer.save_pretrained(tmp / "my-model")
    data = tmp / "my-data"
    data.mkdir()
    rows = [{"instruction": f"{a} plus {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
    (data / "train.json").write_text(json.dumps(rows[:12]))
    (data / "test.json").write_text(json.dumps(rows[12:]))
    conf = tmp / "my-conf"
    (conf / "model").mkdir(parents=True)
    (conf / "task").mkdir()
    (conf / "model" / "my-model.yaml").write_text(
        f"name: my-model\nsource: hub\nhub_id: me/my-model\npath: {tmp / 'my-model'}\ndtype: float32\n")
    (conf / "task" / "my-sums.yaml").write_text(
        f"name: my-sums\nversion: 1\nkind: generation\nmetric: accuracy\nsource: llm_adapters\n"
        f"data_dir: {data}\nfiles: {{train: train.json, test: test.json}}\n"
        "template: \"{instruction} =\"\ntarget: \" {answer}\"\nanswer: number\nmax_new_tokens: 4\n"
        "train_limit: null\neval_limit: null\n")
    return conf


def test_user_config_folder_composes_with_the_shipped_configs(venv):
    env, outside = venv
    conf = _user_folder(outside)
    exe = env / "bin" / "reftbench"
    out = outside / "run"
    # --config-dir: the user's model and task, the shipped intervention and trainer
    res = _run([exe, "--config-dir", conf, "model=my-model", "task=my-sums", "intervention=loreft",
                "intervention.rank=2", *TINY, f"hydra.run.dir={out}"], outside)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((out / "result.json").read_text())
    assert (rec["model"], rec["task"], rec["method"]) == ("my-model", "my-sums", "loreft")
    assert rec["metrics"]["trained"]["n"] == 4 and rec["train"]["steps"] == 2


def test_user_search_path_and_bad_input_from_the_wheel(venv):
    env, outside = venv
    conf = _user_folder(outside / "second")
    exe = env / "bin" / "reftbench"
    # hydra.searchpath: the user's task beside the shipped tiny model (a dry run: no weights)
    res = _run([exe, f"hydra.searchpath=[file://{conf}]", "task=my-sums", "model=tiny-random-llama", "dry_run=true"],
               outside)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "loreft on my-sums (tiny-random-llama" in res.stdout
    # bad input with a user folder is still one line and exit 2 (the precheck sees the user's configs)
    res = _run([exe, "--config-dir", conf, "model=my-model", "intervention.rnak=3", f"hydra.run.dir={outside / 'bad'}"],
               outside)
    errors = [line for line in res.stderr.splitlines() if line.startswith("reftbench: error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(errors) == 1, res.stderr[-1500:]
    assert not (outside / "bad" / "result.json").exists()


def test_precheck_composes_the_users_search_path(tmp_path):
    from reftbench.cli import precheck
    conf = _user_folder(tmp_path)
    assert precheck(["--config-dir", str(conf), "model=my-model", "task=my-sums"]) is None
    assert precheck([f"--config-dir={conf}", "model=my-model", "task=my-sums"]) is None
    assert precheck([f"hydra.searchpath=[file://{conf}]", "model=my-model", "hydra.run.dir=x"]) is None
    assert "task=my-sums is unknown" in precheck(["task=my-sums"])
    assert "intervention.rnak is not an option" in precheck(["-cd", str(conf), "model=my-model", "intervention.rnak=3"])
    assert "task=my-summs is unknown" in precheck([f"hydra.searchpath=[file://{conf}]", "task=my-summs"])
    assert "my-sums" in precheck([f"hydra.searchpath=[file://{conf}]", "task=my-summs"])  # the user's listed too
    assert "is not a folder" in precheck(["--config-dir", str(tmp_path / "nope"), "model=my-model"])
    assert precheck(["-m", "seed=1,2", "intervention.rnak=3"]) is None  # multiruns are Hydra's
