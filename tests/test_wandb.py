"""wandb runs (the real package, offline: no network) carry a name, group and tags from the table,
row, method, task and seed, log per-test-set scores and parameter counts, and are finished, marked
failed, when the run raises. Read back from the offline run's .wandb file with wandb's own protobufs."""
import json
import struct
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import reftbench.run as runner
from reftbench.cli import CONF_DIR

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "llm-adapters"
TABLE_ROW = ["experiment=table1_loreft_llama7b", "model=tiny-random-llama", f"task.data_dir={FIXTURES}",
             "trainer.max_steps=2", "trainer.batch_size=4", "task.eval_limit=2", "task.max_new_tokens=4",
             "intervention.rank=2", "eval_frozen=false", "seed=7", "wandb.enabled=true", "wandb.mode=offline"]


def records(run_dir: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log framing (32 KiB blocks; each chunk: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    out, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            out.append(rec)
            parts = b""
        elif kind == 0:
            break
    return out


def offline_run(tmp_path, monkeypatch, overrides, fail=False):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    wandb.teardown()  # wandb keeps its settings (WANDB_DIR) per process: read them anew
    if fail:
        def broken(*args, **kwargs):
            raise RuntimeError("the training loop broke")
        monkeypatch.setattr(runner, "train", broken)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if fail:
        with pytest.raises(RuntimeError, match="training loop broke"):
            runner.run(cfg, tmp_path / "out")
    else:
        runner.run(cfg, tmp_path / "out")
    assert wandb.run is None  # finished: the next run of a sweep starts a run of its own
    wandb.teardown()  # stop wandb's service: the run's file is complete on disk
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    return records(run_dir)


def value(item):
    """A history item's value: JSON text, or one of the typed fields newer wandb versions write."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    for field in ([kind] if kind else ["integer", "number", "boolean", "text"]):
        if item.HasField(field):
            return getattr(item, field)
    return None


def of(recs, kind):
    return [r for r in recs if r.WhichOneof("record_type") == kind]


def test_offline_run_holds_name_group_tags_scores_and_params(tmp_path, monkeypatch):
    recs = offline_run(tmp_path, monkeypatch, TABLE_ROW)
    (info,) = [r.run for r in of(recs, "run")]
    assert info.display_name == "loreft-commonsense-tiny-random-llama-seed7"
    assert info.run_group == "table1/loreft/commonsense/tiny-random-llama"
    assert set(info.tags) == {"table1", "loreft", "commonsense", "tiny-random-llama", "seed7"}
    logged = {}
    for h in of(recs, "history"):
        logged.update({i.key or "/".join(i.nested_key): value(i) for i in h.history.item})
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    sets = result["metrics"]["trained"]["by_task"]
    assert len(sets) == 8
    for name, v in sets.items():
        assert logged[f"eval/trained/{name}/score"] == pytest.approx(v.get("score", v.get("accuracy")))
    assert logged["eval/trained/score"] == pytest.approx(result["metrics"]["trained"]["score"])
    assert logged["params/trainable"] == result["params"]["trainable"] > 0
    assert logged["params/percent"] == pytest.approx(result["params"]["percent"])
    assert "train/loss" in logged or any(k.startswith("train") for k in logged)
    (end,) = of(recs, "exit")
    assert end.exit.exit_code == 0


def test_a_run_that_raises_is_finished_as_failed(tmp_path, monkeypatch):
    recs = offline_run(tmp_path, monkeypatch, TABLE_ROW, fail=True)
    (end,) = of(recs, "exit")
    assert end.exit.exit_code == 1
    assert not (tmp_path / "out" / "result.json").exists()
