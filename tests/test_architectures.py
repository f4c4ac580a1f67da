"""The architecture table is the one place that knows where a family keeps its parts: every supported
model type resolves its backbone, blocks and every role's Linear through it, with no name probing."""
import pytest
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from reftbench import architectures as archs
from reftbench.errors import ConfigError
from reftbench.methods.peft_methods import resolve_targets

TINY = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=64)
DECODER_TYPES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text"]
ENCODER_TYPES = ["bert", "roberta"]


def tiny(model_type: str) -> nn.Module:
    extra = dict(num_key_value_heads=1, head_dim=8) if model_type not in ENCODER_TYPES else {}
    conf = AutoConfig.for_model(model_type, **TINY, **extra)
    auto = AutoModelForSequenceClassification if model_type in ENCODER_TYPES else AutoModelForCausalLM
    return auto.from_config(conf)


@pytest.mark.parametrize("model_type", DECODER_TYPES + ENCODER_TYPES)
def test_every_supported_type_resolves_through_the_table(model_type):
    model = tiny(model_type)
    arch = archs.for_model(model)
    assert archs.kind(model) == ("encoder" if model_type in ENCODER_TYPES else "decoder")
    bb = archs.backbone(model)
    assert bb is not model and not hasattr(bb, "lm_head") and not hasattr(bb, "classifier")
    blocks = archs.blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2
    for role in arch.roles:
        assert isinstance(archs.get(blocks[0], arch.path(role)), nn.Linear), role
    # LoRA's auto targets are the table's, and each names a Linear the model has
    names = {n.rsplit(".", 1)[-1] for n, m in bb.named_modules() if isinstance(m, nn.Linear)}
    targets = resolve_targets("auto", model)
    assert targets == list(arch.lora_targets) and set(targets) <= names
    assert archs.hidden_size(model) == 16


def test_a_bare_backbone_is_its_own_backbone():
    model = tiny("llama").model
    assert archs.backbone(model) is model and len(archs.blocks(model)) == 2


def test_unknown_type_is_one_clear_line():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match=r"'gpt2' is not supported: reftbench handles decoders llama.*encoders bert"):
        archs.kind(model)
    assert resolve_targets("q_proj;v_proj", model) == ["q_proj", "v_proj"]  # explicit names need no table
