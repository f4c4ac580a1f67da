"""Loading that fits big models: weights straight into their dtype on their device, and the
attention implementation a config names."""
import pytest
import torch
from omegaconf import OmegaConf

from reftbench import models
from reftbench.errors import ConfigError

from conftest import ROOT


def tiny_cfg(**over):
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny-random-llama.yaml")
    cfg.architecture.num_hidden_layers = 1
    for k, v in over.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attn_implementation_reaches_the_model(attn, tmp_path):
    assert models.load(tiny_cfg(attn_implementation=attn)).model.config._attn_implementation == attn
    saved = models.load(tiny_cfg())  # through from_pretrained too (model.path)
    saved.model.save_pretrained(tmp_path), saved.tokenizer.save_pretrained(tmp_path)
    loaded = models.load(tiny_cfg(path=str(tmp_path), attn_implementation=attn))
    assert loaded.model.config._attn_implementation == attn


def test_the_default_is_sdpa():
    cfg = tiny_cfg()
    del cfg["attn_implementation"]
    assert models.load(cfg).model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attn,needle", [("flash", "is unknown"), ("flash_attention_2", "cannot be used here")])
def test_a_bad_attention_is_one_line(attn, needle):
    with pytest.raises(ConfigError) as e:
        models.load(tiny_cfg(attn_implementation=attn))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_weights_are_read_in_their_dtype_onto_their_device(tmp_path, monkeypatch):
    """from_pretrained gets the dtype and, off the CPU, a device map: no fp32 copy in CPU RAM first."""
    saved = models.load(tiny_cfg())
    saved.model.save_pretrained(tmp_path), saved.tokenizer.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("device_map", None)  # no GPU here: load where we can, the call is what is checked
        return real(path, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    loaded = models.load(tiny_cfg(path=str(tmp_path), dtype="bfloat16"), device="cuda:1")
    assert seen[-1]["dtype"] == torch.bfloat16 and seen[-1]["device_map"] == {"": torch.device("cuda:1")}
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    for device in ("cpu", "auto"):  # auto: the GPU where one is visible (none here)
        models.load(tiny_cfg(path=str(tmp_path), dtype="bfloat16"), device=device)
        assert "device_map" not in seen[-1]
