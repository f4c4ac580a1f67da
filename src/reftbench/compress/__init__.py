"""Compress a FineGates model: fold the eval gates into the weights and physically remove what closed
gates make dead (spec §3.2). `shrink(method)` does it in memory; `save`/`load` write and read a
checkpoint (safetensors + the transformers config + compress.json with the per-layer shapes);
`compress_run(RUN_DIR, OUT)` does all of it for a finished run.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import architectures as archs
from ..errors import ConfigError
from ..models import count_params
from .modules import CompactAttention, CompactLinear
from .plan import LayerPlan, plan_counts, plans

FORMAT = "reftbench-finegates-compressed/1"
FINEGATES = ("finegates", "finegates_lora")


def _fold(method, gates: dict, block, layer: int, role: str):
    """Folded fp32 weight and bias of one Linear: g_r W g_c and g_r b (ungated layers as they are)."""
    name = f"{layer}.{method.arch.path(role)}"
    m = archs.get(block, method.arch.path(role))
    if name not in method.linears:
        return m.weight.detach().float(), None if m.bias is None else m.bias.detach().float()
    w, b = method.effective(name)
    gr, gc = gates[name]
    return gr[:, None] * w * gc[None, :], None if b is None else gr * b


def _take(t: torch.Tensor, index: list[int], dim: int) -> torch.Tensor:
    """index_select where -1 picks a zero slice (head padding)."""
    pad = torch.zeros_like(t.narrow(dim, 0, 1))
    ext = torch.cat([t, pad], dim)
    idx = torch.tensor([i if i >= 0 else t.shape[dim] for i in index], dtype=torch.long)
    return ext.index_select(dim, idx)


def _compact(w, b, rows: list[int], cols: list[int], gather: bool, scatter: bool, dtype) -> CompactLinear:
    out_f, in_f = w.shape
    gather = gather and cols != list(range(in_f))
    scatter = scatter and rows != list(range(out_f))
    lin = CompactLinear(len(rows), len(cols), b is not None, len(cols) if gather else None,
                        len(rows) if scatter else None, in_f, out_f, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(_take(_take(w, rows, 0), cols, 1).to(dtype))
        if b is not None:
            lin.bias.copy_(_take(b, rows, 0).to(dtype))
        if gather:
            lin.in_index.copy_(torch.tensor(cols))
        if scatter:
            lin.out_index.copy_(torch.tensor(rows))
    return lin


def _linears(method, gates: dict, block, layer: int, plan: LayerPlan, dtype) -> dict:
    out = {}
    for role in method.arch.roles:
        w, b = _fold(method, gates, block, layer, role)
        n_out, n_in = w.shape
        rows, cols = plan.out_index(role, n_out), plan.in_index(role, n_in)
        readers = role in ("q", "k", "v", "ffn_gate", "ffn_up")  # read the full residual stream
        out[role] = _compact(w, b, rows, cols, gather=readers, scatter=role in ("o", "ffn_down"), dtype=dtype)
    return out


def _attention(model, layer: int, plan: LayerPlan, lins: dict, decoder: bool) -> CompactAttention:
    hd = plan.head_dim
    att = CompactAttention(model.config, layer, plan.heads, plan.kv_heads, plan.m_qk, plan.m_v, hd ** -0.5,
                           plan.rope, lins, decoder)
    if plan.rope:
        with torch.no_grad():
            att.rope_index.copy_(torch.tensor(plan.index["rope"]))
    return att


def _install(model, arch, layer: int, att, lins: dict) -> None:
    block = archs.blocks(model)[layer]
    archs.put(block, arch.attention, att)
    if arch.family == "bert":
        archs.put(block, arch.o, lins["o"])
    for role in ("ffn_gate", "ffn_up", "ffn_down"):
        if arch.path(role):
            archs.put(block, arch.path(role), lins[role])


@torch.no_grad()
def shrink(method) -> dict:
    """Replace the gated model's layers by compact ones, in place; returns the facts for compress.json.
    The method's hooks are removed: the model alone then computes the gated eval forward."""
    model, arch = method.model_ref, method.arch
    dense = count_params(model)
    counts = plan_counts(method)
    removed_per_layer = method.report()["removed_per_layer"]
    gated = sum(m.weight.numel() for m in method.linears.values())
    gates = method.eval_gates()
    ps = plans(method)
    dtype = next(model.parameters()).dtype
    layers = []
    for i, (plan, block) in enumerate(zip(ps, archs.blocks(model))):
        lins = _linears(method, gates, block, i, plan, dtype)
        att = _attention(model, i, plan, lins, decoder=arch.family != "bert")
        layers.append({"heads": plan.heads, "kv_heads": plan.kv_heads, "head_dim": plan.head_dim, "rope": plan.rope,
                       "m_qk": plan.m_qk, "m_v": plan.m_v, "linears": {r: lin.spec() for r, lin in lins.items()}})
        layers[-1]["_modules"] = (att, lins)
    method.remove()
    for i, spec in enumerate(layers):
        _install(model, arch, i, *spec.pop("_modules"))
    after = count_params(model)
    return {"format": FORMAT, "family": arch.family, "layers": layers,
            "params_dense": dense, "params_compressed": after, "gated_weights": gated,
            "removed_per_layer": removed_per_layer,
            "removed_per_layer_share_model": removed_per_layer / dense,
            "removed_per_layer_share_gated": removed_per_layer / gated,
            "removed_cascade": counts["removed_cascade"],
            "removed_cascade_share_model": counts["removed_cascade"] / dense,
            "removed_cascade_share_gated": counts["removed_cascade"] / gated,
            "params_removed_total": dense - after}


def save(model, tokenizer, out, info: dict) -> Path:
    """Write the compressed checkpoint into a temporary folder beside `out`, then rename it into place."""
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(_unique_state(model), str(tmp / "model.safetensors"))
        info = dict(info, auto_class=_auto_name(model), dtype=str(next(model.parameters()).dtype).split(".")[-1])
        (tmp / "compress.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _unique_state(model) -> dict:
    """The state dict with each shared tensor once, under its first name (embed_tokens before a tied lm_head)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen and v.numel():
            continue
        seen.add(v.data_ptr())
        out[k] = v.contiguous()
    return out


def _auto_name(model) -> str:
    return "causal_lm" if archs.for_model(model).family == "llama" else "sequence_classification"


def load(path, tokenizer: bool = False):
    """A working transformers model from a compressed checkpoint (and its tokenizer if asked)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights
    path = Path(path)
    meta_file = path / "compress.json"
    if not meta_file.is_file():
        raise ConfigError(f"{path} is not a compressed checkpoint (no compress.json): make one with reftbench-compress")
    info = json.loads(meta_file.read_text())
    dtype = getattr(torch, info["dtype"])
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if info["auto_class"] == "causal_lm" else AutoModelForSequenceClassification
    with no_init_weights():
        model = cls.from_config(config, dtype=dtype)
    arch = archs.for_model(model)
    for i, layer in enumerate(info["layers"]):
        lins = {r: CompactLinear.from_spec(s, dtype) for r, s in layer["linears"].items()}
        plan = LayerPlan(layer["heads"], layer["kv_heads"], layer["head_dim"], layer["rope"], [], [], [], {}, {},
                         m_qk=layer["m_qk"], m_v=layer["m_v"])
        att = CompactAttention(model.config, i, plan.heads, plan.kv_heads, plan.m_qk, plan.m_v,
                               plan.head_dim ** -0.5, plan.rope, lins, decoder=arch.family != "bert")
        _install(model, arch, i, att, lins)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    missing = [k for k in missing if k not in _tied(model)]
    if missing or unexpected:
        raise ConfigError(f"{path}/model.safetensors does not match compress.json ({(missing + unexpected)[0]})")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the LM head is the (loaded) input embedding
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer:
        from transformers import AutoTokenizer
        return model, AutoTokenizer.from_pretrained(path)
    return model


def _tied(model) -> set:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) | (set(keys.values()) if isinstance(keys, dict) else set())  # safetensors keeps one name


def check_compressible(name: str) -> None:
    from ..methods import REGISTRY
    if name not in REGISTRY or not getattr(REGISTRY[name][1], "compressible", False):
        raise ConfigError(f"compress=true needs a method that removes weights (finegates, finegates_lora), not intervention={name}")


def summary(info: dict) -> dict:
    """compress.json without the per-layer shapes: what result.json records."""
    return {k: v for k, v in info.items() if k != "layers"}


def after_run(method, tokenizer, out, evaluate, timing_batches=None, repeats: int = 5) -> dict:
    """End of a run with compress=true: shrink, save, reload the checkpoint and score it with `evaluate`.
    timing_batches=(examples, collate, batch size): also time the dense forward (gates folded in place)
    against the compressed one on the first two batches (a quick figure; scripts/bench_compress.py is the measurement)."""
    from ..data import to_device
    from .bench import median_seconds, speed
    method.eval()
    model = method.model_ref
    batches = []
    if timing_batches:
        examples, collate, size = timing_batches
        device = next(model.parameters()).device
        batches = [to_device(collate(examples[i:i + size]), device) for i in range(0, min(len(examples), 2 * size), size)]
    timing = {}
    if batches:
        method.merge()  # the dense model's cost: same shapes as the base model, gates folded
        dense = median_seconds(model, batches, repeats)
        method.unmerge()
    info = shrink(method)
    if batches:
        timing = dict(speed(dense, median_seconds(model, batches, repeats)), repeats=repeats,
                      batches=len(batches), threads=torch.get_num_threads())
    save(model, tokenizer, out, info)
    reloaded = load(out).to(next(model.parameters()).device)
    return dict(summary(info), dir=str(out), metrics=evaluate(reloaded), timing=timing)


def compress_run(run_dir, out) -> dict:
    """Load a finished FineGates run (its result.json and saved intervention), compress, save to `out`."""
    from omegaconf import OmegaConf
    from .. import methods, models, tasks
    from ..objectives import OBJECTIVES
    run_dir = Path(run_dir)
    result = run_dir / "result.json"
    if not result.is_file():
        raise ConfigError(f"{run_dir} is not a finished run folder (no result.json): pass the folder a run wrote")
    record = json.loads(result.read_text())
    cfg = OmegaConf.create(record["config"])
    if cfg.intervention.name not in FINEGATES:
        raise ConfigError(f"{run_dir} is a {cfg.intervention.name} run: only finegates and finegates_lora runs can be compressed")
    saved = run_dir / "intervention"
    if not (saved / "weights.safetensors").is_file():
        raise ConfigError(f"{run_dir} has no saved gates (intervention/weights.safetensors): rerun with save_intervention=true")
    task = tasks.build(cfg.task)
    loaded = models.load(cfg.model, kind=OBJECTIVES[task.kind].model_kind, num_labels=task.num_labels,
                         seed=int(cfg.seed))
    return compress_model(loaded.model, loaded.tokenizer, saved, out)


def compress_model(model, tokenizer, saved, out) -> dict:
    from safetensors.torch import load_file
    from .. import methods
    head = Path(saved) / "head.safetensors"
    if head.is_file():
        model.load_state_dict(load_file(str(head)), strict=False)
    method = methods.load(saved, model)
    method.eval()
    info = shrink(method)
    save(model, tokenizer, out, info)
    return info
