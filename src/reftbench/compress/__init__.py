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
from .modules import CompactAttention, CompactLinear, CompactMLP, compact_decoder_layer
from .plan import LayerPlan, plan_counts, plans

FORMAT = "reftbench-finegates-compressed/3"  # /3: v_pad (zero value rows trimmed after attention)
FINEGATES = ("finegates", "finegates_lora")


def _fold(method, gates: dict, block, layer: int, role: str):
    """Folded fp32 weight and bias of one Linear: g_r W g_c and g_r b (ungated or merged layers as they are)."""
    name = f"{layer}.{method.arch.path(role)}"
    m = archs.get(block, method.arch.path(role))
    if name not in method.linears or method.merged:  # merged: the gates are folded in already
        return m.weight.detach().float(), None if m.bias is None else m.bias.detach().float()
    w, b = method.effective(name)
    gr, gc = gates[name]
    return gr[:, None] * w * gc[None, :], None if b is None else gr * b


def _compact(parts: list, cols: list[int] | None, out_rows: list[int] | None, in_f: int, out_f: int,
             dtype, origin: list[int] | None = None, dense_in: int | None = None) -> CompactLinear:
    """One CompactLinear from (weight, bias, rows) parts stacked along the output (a fused q/k/v or
    gate/up), reading `cols` of the input (None: all) and writing `out_rows` of a full-width output
    (None: no scatter). `origin`: the stored columns' indices in the dense weight, `dense_in` wide, where
    the weight's columns were already selected (o_proj, down_proj); a gathered reader's are `cols`."""
    rows = sum(len(r) for _, _, r in parts)
    bias = any(b is not None for _, b, _ in parts)
    n_cols = in_f if cols is None else len(cols)
    if cols is not None:
        origin, dense_in = cols, in_f
    if origin is not None and len(origin) == dense_in:
        origin = dense_in = None  # no column gone: the dense sums as they are
    lin = CompactLinear(rows, n_cols, bias, None if cols is None else len(cols),
                        None if out_rows is None else len(out_rows), in_f, out_f, dtype=dtype,
                        origin=None if origin is None else len(origin), dense_in=dense_in)
    with torch.no_grad():
        at = 0
        for w, b, r in parts:
            idx = torch.tensor(r, dtype=torch.long)
            sub = w.index_select(0, idx)
            if cols is not None:
                sub = sub.index_select(1, torch.tensor(cols, dtype=torch.long))
            lin.weight[at:at + len(r)].copy_(sub.to(dtype))
            if bias:
                lin.bias[at:at + len(r)].copy_(b.index_select(0, idx).to(dtype) if b is not None else 0)
            at += len(r)
        if cols is not None:
            lin.in_index.copy_(torch.tensor(cols))
        if out_rows is not None:
            lin.out_index.copy_(torch.tensor(out_rows))
        if origin is not None:
            lin.origin.copy_(torch.tensor(origin))
    return lin


def _rope_mode(plan: LayerPlan) -> str | None:
    if not plan.rope:
        return None
    if plan.shared:
        return "full" if plan.qk[0] == list(range(plan.head_dim)) else "shared"
    return "per_head"


def _layer(method, gates: dict, block, layer: int, plan: LayerPlan, dtype) -> dict:
    """The compact modules of one block: path -> module."""
    arch, model = method.arch, method.model_ref
    folded = {r: _fold(method, gates, block, layer, r) for r in arch.roles}
    shape = {r: tuple(w.shape) for r, (w, _) in folded.items()}

    def part(role):
        w, b = folded[role]
        return w, b, plan.rows_cols(role, *shape[role])[0]
    d = shape["q"][1]
    parts = [part("q"), part("k"), part("v")]
    if plan.v_pad:  # each kv head's value rows, then v_pad zero rows (sliced off the attention's output)
        w, b, rows = parts[2]
        kv = len(plan.kv_heads)
        idx = torch.tensor(rows)
        wv = torch.cat([w.index_select(0, idx).view(kv, plan.m_v, d), torch.zeros(kv, plan.v_pad, d)], 1)
        bv = None if b is None else torch.cat([b.index_select(0, idx).view(kv, plan.m_v),
                                               torch.zeros(kv, plan.v_pad)], 1).view(-1)
        parts[2] = (wv.view(-1, d), bv, list(range(kv * (plan.m_v + plan.v_pad))))
    if plan.qkv_pad():  # zero rows up to an aligned GEMM; attention ignores them
        parts.append((torch.zeros(plan.qkv_pad(), d), None, list(range(plan.qkv_pad()))))
    qkv = _compact(parts, plan.att_cols, None, d, None, dtype)
    w, b = folded["o"]
    o = _compact([(w.index_select(1, torch.tensor(plan.o_cols())), b,
                   plan.o_rows if plan.o_rows is not None else list(range(shape["o"][0])))],
                 None, plan.o_rows, len(plan.o_cols()), shape["o"][0], dtype, plan.o_cols(), shape["o"][1])
    w, b = folded["ffn_down"]
    down = _compact([(w.index_select(1, torch.tensor(plan.ffn)), b,
                      plan.down_rows if plan.down_rows is not None else list(range(shape["ffn_down"][0])))],
                    None, plan.down_rows, len(plan.ffn), shape["ffn_down"][0], dtype, plan.ffn, shape["ffn_down"][1])
    decoder = arch.family != "bert"
    att = CompactAttention(model.config, layer, len(plan.heads), len(plan.kv_heads), plan.m_qk, plan.m_v,
                           plan.head_dim ** -0.5, _rope_mode(plan), qkv, o if decoder else None, decoder, plan.v_pad)
    if att.rope_index is not None:
        att.rope_index.copy_(torch.tensor(plan.qk[0] if att.rope == "shared" else plan.qk))
    out = {arch.attention: att}
    if decoder:
        up = _compact([part("ffn_gate"), part("ffn_up")], plan.ffn_cols, None, shape["ffn_up"][1], None, dtype)
        out[arch.path("ffn_down").rsplit(".", 1)[0]] = CompactMLP(model.config.hidden_act, up, down)
    else:
        out[arch.o] = o
        out[arch.ffn_up] = _compact([part("ffn_up")], plan.ffn_cols, None, shape["ffn_up"][1], None, dtype)
        out[arch.ffn_down] = down
    return out


def _specs(modules: dict) -> dict:
    return {path: {"type": type(m).__name__, **m.spec()} for path, m in modules.items()}


def _from_specs(config, layer: int, specs: dict, dtype, decoder: bool) -> dict:
    def lin(s):
        return CompactLinear.from_spec(s, dtype)
    out = {}
    for path, s in specs.items():
        if s["type"] == "CompactAttention":
            out[path] = CompactAttention(config, layer, s["heads"], s["kv_heads"], s["m_qk"], s["m_v"], s["scaling"],
                                         s["rope"], lin(s["qkv"]), lin(s["o_proj"]) if decoder else None, decoder,
                                         s.get("v_pad", 0))
        elif s["type"] == "CompactMLP":
            out[path] = CompactMLP(s["act"], lin(s["gate_up"]), lin(s["down_proj"]))
        else:
            out[path] = lin(s)
    return out


def _install(block, modules: dict) -> None:
    for path, m in modules.items():
        archs.put(block, path, m)
    compact_decoder_layer(block)


@torch.no_grad()
def shrink(method) -> dict:
    """Replace the gated model's layers by compact ones, in place, one block at a time: a block's dense
    Linears are released as soon as its compact layers are in, so the model never holds more than the
    dense model plus the compressed one. Returns the facts for compress.json. The method is spent
    afterwards (its hooks are removed and it no longer holds the dense layers); the model alone then
    computes the gated eval forward."""
    model, arch = method.model_ref, method.arch
    dense = count_params(model)
    counts = plan_counts(method)
    rep = method.report()
    gated = sum(m.weight.numel() for m in method.linears.values())
    linear = method.linear_weights
    gates = method.eval_gates()
    ps = plans(method)
    dtype = next(model.parameters()).dtype
    method.remove()
    layers = []
    for i, (plan, block) in enumerate(zip(ps, archs.blocks(model))):
        modules = _layer(method, gates, block, i, plan, dtype)
        layers.append({"heads": len(plan.heads), "kv_heads": len(plan.kv_heads), "head_dim": plan.head_dim,
                       "m_qk": plan.m_qk, "m_v": plan.m_v, "units": len(plan.ffn), "modules": _specs(modules)})
        _install(block, modules)
        for n in [n for n in method.linears if n.startswith(f"{i}.")]:
            del method.linears[n]  # the dense Linear is referenced by nothing now: freed
        gates = {n: g for n, g in gates.items() if not n.startswith(f"{i}.")}
    method.biases = torch.nn.ParameterDict()
    if method.lora:
        method.adapters = torch.nn.ModuleDict()
    method._merged = None
    after = count_params(model)
    removed = counts["removed_cascade"]
    return {"format": FORMAT, "family": arch.family, "layers": layers,
            "params_dense": dense, "params_compressed": after, "gated_weights": gated, "linear_weights": linear,
            "removed_per_layer": rep["removed_per_layer"],
            "removed_per_layer_share_model": rep["removed_per_layer"] / dense,
            "removed_per_layer_share_gated": rep["removed_per_layer"] / gated,
            "removed_per_layer_share_linear": rep["removed_per_layer"] / linear,
            "removed_cascade": removed,
            "removed_cascade_share_model": removed / dense,
            "removed_cascade_share_gated": removed / gated,
            "removed_cascade_share_linear": removed / linear,
            "params_removed_total": dense - after}


def save(model, tokenizer, out, info: dict) -> Path:
    """Write the compressed checkpoint into a temporary folder beside `out`, then rename it into place."""
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)  # the runner's suppressed pad token, eos ids
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
    if info.get("format") != FORMAT:
        raise ConfigError(f"{path} is a {info.get('format')} checkpoint; this reftbench reads {FORMAT}: "
                          "compress the run again with reftbench-compress")
    dtype = getattr(torch, info["dtype"])
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if info["auto_class"] == "causal_lm" else AutoModelForSequenceClassification
    with no_init_weights():
        model = cls.from_config(config, dtype=dtype)
    arch = archs.for_model(model)
    for i, (layer, block) in enumerate(zip(info["layers"], archs.blocks(model))):
        _install(block, _from_specs(model.config, i, layer["modules"], dtype, decoder=arch.family != "bert"))
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    missing = [k for k in missing if k not in _tied(model)]
    if missing or unexpected:
        raise ConfigError(f"{path}/model.safetensors does not match compress.json ({(missing + unexpected)[0]})")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the LM head is the (loaded) input embedding
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(path)
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
    Memory: the dense model, then (while shrinking) at most dense + compressed, then two compressed copies.
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
    if batches:  # the dense model's cost: gates folded in place (no copy kept), then shrunk as they are
        method.merge(keep_original=False)
        dense = median_seconds(model, batches, repeats)
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
