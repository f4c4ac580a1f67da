"""`reftbench-export`: merged models whose logits equal the run's, peft's adapter format, and one-line
refusals (a LoReFT run cannot be merged; no folder; no saved weights)."""
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from reftbench.cli import CONF_DIR
from reftbench.integrations import export
from reftbench.integrations.runs import load_run
from reftbench.run import run

TINY = ["model=tiny-random-llama", "trainer.max_steps=3", "task.train_limit=12", "task.eval_limit=2",
        "trainer.batch_size=4", "eval_batch_size=4", "eval_frozen=false"]
IDS = {"input_ids": torch.tensor([[1, 20, 21, 14, 22, 30], [1, 25, 13, 24, 30, 31]])}


def train_run(folder: Path, *overrides) -> Path:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=TINY + list(overrides))
    run(cfg, folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {name: train_run(root / name, f"intervention={name}", *extra) for name, extra in {
        "lora": ["trainer.lr=1e-2"], "dora": ["trainer.lr=1e-2"], "full": ["trainer.lr=1e-3"],
        "loreft": ["intervention.rank=2"]}.items()}


def run_logits(run_dir: Path) -> torch.Tensor:
    loaded = load_run(run_dir)
    batch = dict(IDS, prompt_lengths=[6, 6], prompt_offsets=[0, 0])
    with torch.no_grad(), loaded.method.context(batch):
        return loaded.model(**IDS).logits


def frozen_logits() -> torch.Tensor:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_llama
    with torch.no_grad():
        return tiny_llama(seed=42).model(**IDS).logits  # the runs' seed: the same random base


@pytest.mark.parametrize("name", ["lora", "dora", "full"])
def test_merged_export_is_a_plain_model_with_the_runs_logits(runs, name, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "merged"
    assert export.main([str(runs[name]), "--out", str(out), "--merged"]) == 0
    assert "transformers model folder" in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(out)("1+2")["input_ids"][0] == 1
    with torch.no_grad():
        theirs = model(**IDS).logits
    ours = run_logits(runs[name])
    assert (ours - frozen_logits()).abs().max() > 1e-3  # the run did change the model
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_peft_export_loads_with_peft(runs, tmp_path):
    from peft import PeftModel
    out = tmp_path / "adapter"
    assert export.main([str(runs["dora"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_llama
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(tiny_llama(seed=42).model, out).eval()(**IDS).logits
    torch.testing.assert_close(theirs, run_logits(runs["dora"]), rtol=0, atol=1e-6)


def test_loreft_cannot_be_merged(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert export.main([str(runs["loreft"]), "--out", str(out), "--merged"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reftbench-export: error:")
    assert "cannot be merged" in err[0] and "residual stream" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_reft_export_goes_through_the_pyreft_integration(runs, tmp_path, monkeypatch):
    calls = []

    def save_pyreft(method, folder):
        calls.append((method.config.name, Path(folder)))
        (Path(folder) / "marker").write_text("written")
    monkeypatch.setitem(sys.modules, "reftbench.integrations.pyreft", types.SimpleNamespace(save_pyreft=save_pyreft))
    out = tmp_path / "pyreft"
    assert export.main([str(runs["loreft"]), "--out", str(out)]) == 0
    assert calls and calls[0][0] == "loreft" and (out / "marker").read_text() == "written"


def test_missing_folder_and_missing_weights_are_one_line(runs, tmp_path, capsys):
    assert export.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o1")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    record = json.loads((runs["lora"] / "result.json").read_text())
    (bare / "result.json").write_text(json.dumps(record))  # a run made with save_intervention=false
    assert export.main([str(bare), "--out", str(tmp_path / "o2"), "--merged"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no saved weights" in err[0]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    assert export.main([str(runs["lora"]), "--out", str(taken)]) == 2
    assert "not an empty folder" in capsys.readouterr().err and taken.read_text() == "a file, not a folder"


@pytest.mark.parametrize("name,saved", [
    ("orthdireft", {"learned_source.weight", "rotate_layer.parametrizations.weight.original"}),
    ("consreft", {"learned_source", "rotate_layer.parametrizations.weight.0.base"}),
    ("lobireft", {"learned_source", "rotate_layer.parametrizations.weight.original"}),
])
def test_the_whole_reft_family_exports_in_pyreft_format(name, saved, tmp_path):
    from reftbench.integrations import pyreft
    run_dir = train_run(tmp_path / name, f"intervention={name}", "intervention.rank=2", "trainer.lr=1e-2")
    out = tmp_path / "pyreft"
    assert export.main([str(run_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert {pyreft.class_name(t) for t in config["intervention_types"]} == {pyreft.PYREFT_CLASS[name]}
    bins = sorted(out.glob("intkey_*.bin"))
    assert bins and saved <= set(pyreft.read_bin(bins[0]))
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_llama
    base = tiny_llama(seed=42).model
    method = pyreft.load(out, base)  # pyreft's files alone give back the run's intervention
    batch = dict(IDS, prompt_lengths=[6, 6], prompt_offsets=[0, 0])
    with torch.no_grad(), method.context(batch):
        logits = base(**IDS).logits
    assert torch.allclose(logits, run_logits(run_dir), atol=1e-5)
    assert not torch.allclose(logits, frozen_logits(), atol=1e-4)  # the intervention does something
