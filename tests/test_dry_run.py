"""Plans that cost nothing: parameter counts from shipped architecture files, on the meta device."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from reftbench.run import plan

CONF = Path(__file__).resolve().parents[1] / "conf"


def _plan(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return plan(compose("config", overrides=["dry_run=true", *overrides]))


def test_llama7b_loreft_matches_the_paper():
    # Paper, Table 1: LoReFT on LLaMA-7B, rank 8, all 32 layers, f7+l7 tied: 2.097M params, 0.031%.
    p = _plan("model=llama-7b", "intervention.rank=8", "intervention.positions=f7+l7", "intervention.share_weights=true")
    d, r, layers = 4096, 8, 32
    assert p["params"]["trainable"] == layers * (2 * r * d + r) == 2_097_408
    assert p["params"]["base"] == 6_738_415_616
    assert round(p["params"]["percent"], 3) == 0.031


def test_untied_doubles_the_interventions():
    tied = _plan("model=llama2-7b", "intervention.rank=4")["params"]["trainable"]
    untied = _plan("model=llama2-7b", "intervention.rank=4", "intervention.share_weights=false")["params"]["trainable"]
    assert untied == 2 * tied == 2 * 32 * (2 * 4 * 4096 + 4)


@pytest.mark.parametrize("model,base", [("llama-13b", 13_015_864_320), ("llama3-8b", 8_030_261_248),
                                        ("smollm2-135m", 134_515_008)])
def test_shipped_architectures_give_known_sizes(model, base):
    assert _plan(f"model={model}")["params"]["base"] == base
