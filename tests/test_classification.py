"""GLUE-style sequence classification through the runner, on a tiny random BERT."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from reftbench import methods
from reftbench.run import _Selection, run

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "glue" / "SST-2"


def _cfg(*overrides, reft=True):
    reft_options = ["intervention.positions=f1", "intervention.rank=2"] if reft else []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["model=tiny-random-bert", "task=sst2", f"task.data_dir={FIXTURES}",
                                            "trainer.epochs=3", "trainer.batch_size=4", "trainer.lr=1e-2",
                                            *reft_options, *overrides])


def test_sst2_runs_with_selection_and_head_not_counted(tmp_path):
    rec = run(_cfg(), tmp_path)
    assert rec["metric"] == "accuracy" and "frozen" not in rec["metrics"]
    t = rec["metrics"]["trained"]
    assert 0 <= t["score"] <= 1 and t["score"] == t["accuracy"]
    assert rec["train"]["epochs"] == 3 and rec["train"]["best_epoch"] in (1, 2, 3)
    layers, d, r = 2, 32, 2
    assert rec["params"]["trainable"] == layers * (2 * r * d + r)  # the head trains but is not counted
    # the saved head (model names) and intervention reproduce the trained model's predictions
    from safetensors.torch import load_file
    from reftbench import models
    from reftbench.data import collate_classification, encode_pair
    from reftbench.tasks import build
    cfg = _cfg()
    loaded = models.load(cfg.model, kind="encoder", num_labels=2, seed=42)
    head = load_file(str(tmp_path / "intervention" / "head.safetensors"))
    assert not torch.equal(head["classifier.weight"], loaded.model.classifier.weight)  # it trained
    assert set(head) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    loaded.model.load_state_dict(head, strict=False)
    m = methods.load(tmp_path / "intervention", loaded.model)
    test = build(cfg.task).load_splits(42)["test"]
    batch = collate_classification([encode_pair(loaded.tokenizer, r, 64) for r in test], loaded.tokenizer.pad_token_id)
    with torch.no_grad(), m.context(batch):
        preds = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert [s["prediction"] for s in rec["samples"]] == [str(p) for p in preds.tolist()][:5]
    assert json.loads((tmp_path / "result.json").read_text())["metrics"] == rec["metrics"]


def test_linear_probe_trains_only_the_head(tmp_path):
    rec = run(_cfg("intervention=none", reft=False), tmp_path)
    assert rec["params"]["trainable"] == 0 and rec["train"]["steps"] > 0


def test_selection_restores_the_best_epoch():
    class Fake:
        scores = iter([0.5, 0.9, 0.7])

        def evaluate(self, *a, **k):
            return {"score": next(self.scores), "n": 1}, []

    model = torch.nn.Linear(2, 2)
    m = methods.build({"name": "none"}, model)
    head = list(model.parameters())
    sel = _Selection(Fake(), model, m, head, records=[1], batch_size=1)
    for epoch, value in ((1, 1.0), (2, 2.0), (3, 3.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        sel(epoch)
    info = sel.restore_best()
    assert info == {"best_epoch": 2, "selection_score": 0.9}
    assert torch.all(model.weight == 2.0)


@pytest.mark.parametrize("scores,best_epoch,best", [
    ([float("nan")] * 3, 1, None),                      # a constant STS-B prediction every epoch
    ([float("nan"), 0.3, float("nan")], 2, 0.3),        # a number beats NaN, whichever comes first
    ([0.2, float("nan"), 0.1], 1, 0.2),
])
def test_selection_survives_nan_scores(scores, best_epoch, best):
    class Fake:
        it = iter(scores)

        def evaluate(self, *a, **k):
            return {"score": next(self.it), "n": 1}, []

    model = torch.nn.Linear(2, 2)
    sel = _Selection(Fake(), model, methods.build({"name": "none"}, model), list(model.parameters()),
                     records=[1], batch_size=1)
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        sel(epoch)
    assert sel.restore_best() == {"best_epoch": best_epoch, "selection_score": best}
    assert torch.all(model.weight == float(best_epoch))
    json.dumps(sel.restore_best(), allow_nan=False)  # the record stays valid JSON
