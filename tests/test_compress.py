"""Compression (spec §3.2): the shrunk model computes the gated model's eval forward, per layer and end to
end, with the fused MLP, V→O, Q/K and RoPE-pair rules; it saves and loads; bad input is one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_bert, tiny_llama
from reftbench import compress, methods
from reftbench.compress import plan as plan_mod
from reftbench.errors import ConfigError

TOL = 1e-5
ROOT_DIR = Path(__file__).resolve().parents[1]


def gated(model, seed=0, mean=0.4, std=1.0, **kw):
    """A FineGates method with random logits: a mix of closed, fractional and open gates."""
    m = methods.build({"name": "finegates", **kw}, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + mean)
    m.eval()
    return m


def inputs(seed=0, batch=3, length=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 90, (batch, length), generator=g)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding in one row
    return x, mask


def forward(model, x, mask):
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states


def test_compressed_equals_gated_per_layer_and_end_to_end_llama():
    model = tiny_llama().model
    m = gated(model)
    x, mask = inputs()
    ref_logits, ref_hidden = forward(model, x, mask)
    info = compress.shrink(m)
    logits, hidden = forward(model, x, mask)
    keep = mask.bool()
    for i, (a, b) in enumerate(zip(ref_hidden, hidden)):  # every block's output
        assert (a - b)[keep].abs().max() < TOL, f"layer {i}"
    assert (ref_logits - logits)[keep].abs().max() < TOL
    assert info["params_compressed"] < info["params_dense"]
    assert info["removed_cascade"] >= info["removed_per_layer"] > 0


def test_compressed_equals_gated_bert_with_biases():
    model = tiny_bert()
    m = gated(model, seed=1)
    with torch.no_grad():  # trained biases are part of what is folded
        for b in m.biases.values():
            b.add_(0.1)
    x, mask = inputs()
    ref_logits, ref_hidden = forward(model, x, mask)
    compress.shrink(m)
    logits, hidden = forward(model, x, mask)
    for a, b in zip(ref_hidden, hidden):
        assert (a - b).abs().max() < TOL
    assert (ref_logits - logits).abs().max() < TOL


def _one_block_plan(model, m):
    return plan_mod.plans(m)[0]


def test_fused_mlp_keeps_a_unit_only_if_open_in_every_reader_and_writer():
    model = tiny_llama().model
    m = gated(model, mean=5.0, std=0.0)  # everything open
    with torch.no_grad():
        m.gates["0-mlp-gate_proj"].rows.logits[0:5] = -5   # units 0-4 dead through gate
        m.gates["0-mlp-up_proj"].rows.logits[10:13] = -5    # 10-12 through up
        m.gates["0-mlp-down_proj"].cols.logits[20:22] = -5  # 20-21 through down
        m.gates["0-mlp-up_proj"].cols.logits[:8] = -5       # 8 input columns closed in up_proj only:
        m.gates["0-mlp-up_proj"].cols.logits[10:14] = -5    # gate_proj still reads them, so nothing is gathered
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    p = _one_block_plan(model, m)
    assert len(p.ffn) == 118 and p.ffn_cols is None
    with torch.no_grad():
        m.gates["0-mlp-gate_proj"].cols.logits[:8] = -5     # now closed in both readers: one gather drops them
    ref, _ = forward(model, x, mask)
    compress.shrink(m)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up.weight.shape == (2 * 118, 56) and mlp.down_proj.weight.shape == (64, 118)
    assert mlp.gate_up.in_index is not None and mlp.down_proj.out_index is None  # nothing to scatter
    assert model.model.layers[1].mlp.gate_up.weight.shape == (2 * 128, 64)
    assert model.model.layers[1].mlp.gate_up.in_index is None  # all columns open: no gather at all
    assert (forward(model, x, mask)[0] - ref).abs().max() < TOL


def test_value_dims_go_with_their_output_columns():
    model = tiny_llama().model  # 4 query heads, 2 kv heads, head_dim 16: heads 0,1 share kv head 0
    m = gated(model, mean=5.0, std=0.0)
    with torch.no_grad():
        m.gates["0-self_attn-v_proj"].rows.logits[0:3] = -5      # kv head 0, dims 0-2
        m.gates["0-self_attn-o_proj"].cols.logits[16 + 5] = -5   # head 1 dim 5 only: head 0 still reads it
        m.gates["0-self_attn-o_proj"].cols.logits[6] = -5        # head 0 dim 6 ...
        m.gates["0-self_attn-o_proj"].cols.logits[16 + 6] = -5   # ... and head 1 dim 6: value dim 6 is dead
        m.gates["0-self_attn-v_proj"].rows.logits[16:26] = -5    # kv head 1 loses 10 dims
    p = _one_block_plan(model, m)
    # kv head 1's 6 live dims (10-15) lie inside kv head 0's 12: one uniform set of dims for the layer
    assert p.v[0] == p.v[1] == [d for d in range(16) if d not in (0, 1, 2, 6)] and p.m_v == 12
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    compress.shrink(m)
    att = model.model.layers[0].self_attn
    assert att.qkv.weight.shape == (4 * 16 + 2 * 16 + 2 * 12, 64) and att.o_proj.weight.shape == (64, 4 * 12)
    assert (forward(model, x, mask)[0] - ref).abs().max() < TOL


def test_qk_dims_without_rope_drop_singly_and_keep_the_original_scale():
    model = tiny_bert()  # 4 heads of 8 dims, no RoPE
    m = gated(model, mean=5.0, std=0.0)
    with torch.no_grad():
        m.gates["0-attention-self-query"].rows.logits[[0, 1, 2]] = -5   # head 0: q dims 0-2
        m.gates["0-attention-self-key"].rows.logits[[3, 8 + 1]] = -5    # head 0 dim 3, head 1 dim 1
    p = _one_block_plan(model, m)
    assert p.qk == [list(range(8))] * 4  # heads 2 and 3 keep all 8 dims: no narrower uniform width exists
    with torch.no_grad():  # now every head loses at least 2 dims
        for h in range(4):
            m.gates["0-attention-self-key"].rows.logits[[8 * h + 6, 8 * h + 7]] = -5
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    compress.shrink(m)
    att = model.bert.encoder.layer[0].attention.self
    assert att.m_qk == 6 and att.qkv.weight.shape == (4 * 6 + 4 * 6 + 4 * 8, 32)
    assert att.scaling == pytest.approx(8 ** -0.5)
    assert (forward(model, x, mask)[0] - ref).abs().max() < TOL


def _close_single_rotary_dims(m):
    with torch.no_grad():  # in every q head of kv head 0: dims 0..3 closed, their partners 8..11 open
        for h in (0, 1):
            m.gates["0-self_attn-q_proj"].rows.logits[16 * h: 16 * h + 4] = -5
        m.gates["0-self_attn-k_proj"].rows.logits[[5, 13]] = -5  # a whole pair of kv head 0 (5, 5 + 8)
        m.gates["0-self_attn-k_proj"].rows.logits[16 + 2] = -5   # kv head 1: dim 2 alone


def test_rope_dims_go_in_pairs_and_the_result_is_exact():
    model = tiny_llama().model
    m = gated(model, mean=5.0, std=0.0)
    _close_single_rotary_dims(m)
    p = _one_block_plan(model, m)
    assert p.qk == [list(range(16))] * 2  # kv head 0 lost pair 5, kv head 1 none: the uniform width is 16
    with torch.no_grad():
        m.gates["0-self_attn-k_proj"].rows.logits[[16 + 5, 16 + 13]] = -5  # pair 5 of kv head 1 too
    p = _one_block_plan(model, m)
    pairs = [0, 1, 2, 3, 4, 6, 7]  # pairs (d, d+8): only pair 5 is dead (its k is closed in full)
    assert p.qk == [pairs + [d + 8 for d in pairs]] * 2 and p.shared
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    compress.shrink(m)
    att = model.model.layers[0].self_attn
    assert att.rope == "shared" and att.m_qk == 14 and model.model.layers[1].self_attn.rope == "full"
    assert (forward(model, x, mask)[0] - ref).abs().max() < TOL


def test_heads_with_different_dead_pairs_keep_their_own_dims_at_one_width():
    model = tiny_llama().model
    m = gated(model, mean=5.0, std=0.0)
    with torch.no_grad():
        m.gates["0-self_attn-k_proj"].rows.logits[[5, 13]] = -5            # kv head 0: pair 5
        m.gates["0-self_attn-k_proj"].rows.logits[[16 + 2, 16 + 10]] = -5  # kv head 1: pair 2
        m.gates["0-self_attn-v_proj"].rows.logits[[1, 16 + 3]] = -5        # one value dim each
    p = _one_block_plan(model, m)
    assert not p.shared and p.m_qk == 14 and p.m_v == 15
    assert p.qk[0][:7] == [0, 1, 2, 3, 4, 6, 7] and p.qk[1][:7] == [0, 1, 3, 4, 5, 6, 7]
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    compress.shrink(m)
    att = model.model.layers[0].self_attn
    assert att.rope == "per_head" and tuple(att.rope_index.shape) == (2, 14)
    assert (forward(model, x, mask)[0] - ref).abs().max() < TOL


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_whole_heads_go_when_their_output_is_closed(family):
    model = tiny_llama().model if family == "llama" else tiny_bert()
    m = gated(model, mean=5.0, std=0.0)
    hd = 16 if family == "llama" else 8
    o = "0-self_attn-o_proj" if family == "llama" else "0-attention-output-dense"
    with torch.no_grad():
        m.gates[o].cols.logits[1 * hd:2 * hd] = -5   # head 1 writes nothing
        m.gates[o].cols.logits[3 * hd:4 * hd] = -5   # nor head 3
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    p = _one_block_plan(model, m)
    assert p.heads == [0, 2] and p.kv_heads == ([0, 1] if family == "llama" else [0, 2])
    if family == "llama":  # GQA: the whole kv head 1 goes when both its query heads are dead
        with torch.no_grad():
            m.gates[o].cols.logits[2 * hd:3 * hd] = -5
        ref, _ = forward(model, x, mask)
        p = _one_block_plan(model, m)
        assert p.heads == [0] and p.kv_heads == [0]
    compress.shrink(m)
    layer = model.model.layers[0].self_attn if family == "llama" else model.bert.encoder.layer[0].attention.self
    assert layer.heads == len(p.heads) and layer.kv_heads == len(p.kv_heads)
    assert (forward(model, x, mask)[0] - ref)[mask.bool() if family == "llama" else slice(None)].abs().max() < TOL


def test_dropping_single_rotary_dims_breaks_equality(monkeypatch):
    model = tiny_llama().model
    m = gated(model, mean=5.0, std=0.0)
    _close_single_rotary_dims(m)
    with torch.no_grad():  # close every q dim 0..7 but leave partners: single-dim dropping would remove them
        for h in range(4):
            m.gates["0-self_attn-q_proj"].rows.logits[16 * h: 16 * h + 8] = -5
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    # the wrong rule: treat q/k dims as independent (as without RoPE), keeping the rotation of what is left
    real_plan = plan_mod.layer_plan

    def single_dims(arch, n, kv, hd, gates):
        from dataclasses import replace
        p = real_plan(replace(arch, rope=False), n, kv, hd, gates)
        p.rope = True
        return p
    monkeypatch.setattr(plan_mod, "layer_plan", single_dims)
    compress.shrink(m)
    wrong = (forward(model, x, mask)[0] - ref).abs().max()
    assert wrong > 1e-3  # zeroing q_d before RoPE does not zero the rotated q_d


def test_pair_rule_passes_where_single_dims_fail():
    model = tiny_llama().model
    m = gated(model, mean=5.0, std=0.0)
    with torch.no_grad():
        for h in range(4):
            m.gates["0-self_attn-q_proj"].rows.logits[16 * h: 16 * h + 8] = -5
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    compress.shrink(m)
    assert model.model.layers[0].self_attn.m_qk == 16  # no pair is dead in full: nothing dropped
    assert (forward(model, x, mask)[0] - ref).abs().max() < TOL


def test_accounting_matches_numel_of_the_shrunk_matrices():
    from reftbench.compress import _compact
    w, b = torch.randn(7, 5), torch.randn(7)
    rows, cols = [0, 2, 3, 4, 6], [1, 2, 3, 4]
    lin = _compact([(w, b, rows)], cols, rows, 5, 7, dtype=torch.float32)
    assert w.numel() - lin.weight.numel() == 15 == 7 * 5 - len(rows) * len(cols)
    x = torch.randn(3, 5)
    x_zeroed = x.clone()
    x_zeroed[:, 0] = 0
    full = torch.zeros(3, 7)
    full[:, rows] = (x_zeroed @ w.T + b)[:, rows]
    assert torch.allclose(lin(x), full, atol=1e-6)


def test_report_counts_both_ways_as_shares_of_the_model_and_the_gated_weights():
    model = tiny_llama().model
    m = gated(model)
    rep = m.report()
    info = compress.shrink(m)
    assert info["removed_per_layer"] == rep["removed_per_layer"]
    assert info["removed_cascade"] == rep["removed_cascade"]
    assert info["removed_per_layer_share_model"] == pytest.approx(rep["removed_per_layer"] / info["params_dense"])
    assert info["removed_cascade_share_gated"] == pytest.approx(rep["removed_cascade"] / info["gated_weights"])
    # the count is what is physically gone: every removed element is missing from the parameter count
    assert info["params_dense"] - info["params_compressed"] == info["removed_cascade"]  # no biases in LLaMA
    assert info["removed_cascade_share_linear"] == pytest.approx(rep["removed_cascade"] / m.linear_weights)


def test_save_and_load_give_a_working_model_with_generation(tmp_path):
    loaded = tiny_llama()
    model = loaded.model
    m = gated(model, seed=3)
    x = torch.randint(4, 90, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        ref_gen = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    info = compress.shrink(m)
    out = compress.save(model, loaded.tokenizer, tmp_path / "c", info)
    again, tok = compress.load(out, tokenizer=True)
    assert type(again).__name__ == "LlamaForCausalLM" and tok is not None
    with torch.no_grad():
        assert (again(input_ids=x).logits - ref).abs().max() < TOL
        assert torch.equal(again.generate(input_ids=x, max_new_tokens=5, do_sample=False), ref_gen)
    shapes = {s["modules"]["self_attn"]["qkv"]["rows"] for s in json.loads((out / "compress.json").read_text())["layers"]}
    assert len(shapes) > 1  # layers of different sizes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_bert_save_and_load(tmp_path):
    model = tiny_bert()
    m = gated(model, seed=4)
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    compress.save(model, None, tmp_path / "c", compress.shrink(m))
    again = compress.load(tmp_path / "c")
    assert (forward(again, x, mask)[0] - ref).abs().max() < TOL


def test_load_of_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not a compressed checkpoint"):
        compress.load(tmp_path)


def _cli(*args, cwd):
    exe = Path(sys.executable).with_name("reftbench-compress")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reftbench.compress.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _reftbench(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run([sys.executable, "-c", "from reftbench.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


GLUE = Path(__file__).resolve().parent / "fixtures" / "glue" / "SST-2"
TINY_GLUE = ["model=tiny-random-bert", "task=sst2", f"task.data_dir={GLUE}", "trainer.max_steps=3",
             "task.train_limit=16", "trainer.batch_size=4", "eval_batch_size=8"]


def test_a_run_with_compress_true_records_an_identical_score_and_the_cli_compresses_it(tmp_path):
    run = tmp_path / "run"
    res = _reftbench(*TINY_GLUE, "intervention=finegates", "intervention.init_mean=-0.5", "compress=true",
                     f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((run / "result.json").read_text())
    c = rec["compressed"]
    assert c["metrics"]["score"] == rec["metrics"]["trained"]["score"]
    assert Path(c["dir"]) == run / "compressed" and (run / "compressed" / "model.safetensors").is_file()
    assert rec["method_report"]["closed_rows"] + rec["method_report"]["closed_cols"] > 0
    res = _cli(str(run), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "compress.json").read_text())["params_compressed"] == c["params_compressed"]


def test_bad_compress_input_is_one_line_and_writes_nothing(tmp_path):
    res = _cli(str(tmp_path / "nope"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no result.json" in res.stderr
    run = tmp_path / "lora"  # a finished run of another method: only its record is read
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"config": {"intervention": {"name": "lora"}}}))
    res = _cli(str(run), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 2 and "only finegates" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    res = _reftbench(*TINY_GLUE, "intervention=lora", "compress=true", f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path)
    assert res.returncode == 2 and "compress=true" in res.stderr and not (tmp_path / "r2" / "result.json").exists()


def test_tied_embeddings_survive_save_and_load(tmp_path):
    from omegaconf import OmegaConf
    from reftbench import models
    from conftest import ROOT
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny-random-llama.yaml")
    cfg.architecture.tie_word_embeddings = True  # as SmolLM2: the LM head is the input embedding
    loaded = models.load(cfg)
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    m = gated(model, seed=5)
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    compress.save(model, loaded.tokenizer, tmp_path / "c", compress.shrink(m))
    again = compress.load(tmp_path / "c")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert (forward(again, x, mask)[0] - ref)[mask.bool()].abs().max() < TOL


def test_shrink_frees_the_dense_layers_it_replaces():
    import gc
    import weakref
    model = tiny_llama().model
    m = gated(model, seed=6)
    block = model.model.layers[0]
    dense = [weakref.ref(x) for x in (block.self_attn, block.self_attn.q_proj, block.self_attn.q_proj.weight,
                                      block.mlp.down_proj, block.mlp.down_proj.weight)]
    m.merge(keep_original=False)  # as compress=true does for its timing: no copy of the weights kept
    compress.shrink(m)
    gc.collect()
    assert all(r() is None for r in dense)  # nothing (method, hooks, merge copies) holds them any more
    assert not m.linears


def test_compress_true_peak_memory_is_dense_plus_compressed(tmp_path):
    """Bytes of live tensors while shrinking never exceed the dense weights plus the compact ones."""
    import gc

    def live_cpu_tensors():
        gc.collect()
        return [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 64]

    # other tests' tensors still alive in this process are not this test's (held, so no new tensor reuses them)
    held = live_cpu_tensors()
    earlier = {t.data_ptr() for t in held}
    model = tiny_llama(layers=6).model
    m = gated(model, seed=7)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = [0]
    real = compress._install

    def install(block, modules):
        real(block, modules)
        live = {t.data_ptr(): t.numel() * t.element_size() for t in live_cpu_tensors() if t.data_ptr() not in earlier}
        peak[0] = max(peak[0], sum(live.values()))
    compress._install = install
    try:
        m.merge(keep_original=False)
        info = compress.shrink(m)
    finally:
        compress._install = real
    compact_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert info["params_compressed"] < info["params_dense"]
    assert peak[0] <= dense_bytes + compact_bytes + 64 * 1024  # + the gates and one layer's indices


def test_generation_config_survives_compression(tmp_path):
    loaded = tiny_llama()
    model = loaded.model
    model.generation_config.pad_token_id = 3
    model.generation_config.suppress_tokens = [3]
    model.generation_config.eos_token_id = [2, 5]
    out = compress.save(model, loaded.tokenizer, tmp_path / "c", compress.shrink(gated(model, seed=8)))
    again = compress.load(out)
    assert again.generation_config.suppress_tokens == [3] and again.generation_config.pad_token_id == 3
    assert again.generation_config.eos_token_id == [2, 5]


def test_compressible_types_come_from_the_architecture_table():
    from reftbench import architectures as archs
    assert set(archs.compressible_types()) == {"llama", "mistral", "qwen2", "bert", "roberta"}
    assert "gemma" in archs.LLAMA.model_types and "gemma" not in archs.compressible_types()
    assert not hasattr(plan_mod, "COMPRESSIBLE")


def test_bench_random_gates_mode_removes_the_asked_share_and_matches_the_gated_model(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_compress", ROOT_DIR / "scripts" / "bench_compress.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--random-gates", "0.3", "--model", "tiny-random-llama", "--repeats", "1", "--warmup", "0",
                      "--new-tokens", "3", "--length", "8", "--batch-size", "2"])
    assert abs(out["removed_share_linear"] - 0.3) < 0.03
    assert out["max_abs_dlogit"] <= 1e-4 and out["max_abs_dlogit_fp64"] <= 1e-10 and out["same_greedy_tokens"]
    assert out["one_ratio"] > 0 and out["batched_ratio"] > 0 and out["bound_linear_flops_and_bytes"] > 1.2
    printed = capsys.readouterr().out
    assert "greedy decoding, batch 1" in printed and "batched forward" in printed


def _close_two_pairs(m):
    for g in (0, 1):  # rotary pairs (0, 8) and (1, 9) of both kv heads
        m.gates["0-self_attn-k_proj"].rows.logits[[16 * g, 16 * g + 1, 16 * g + 8, 16 * g + 9]] = -5


def test_narrow_values_are_padded_to_the_qk_width_and_trimmed_before_o_proj(monkeypatch):
    """Real-sized layout rules on the tiny model: one stored width for q, k and v (SDPA's fused kernel)."""
    monkeypatch.setattr(plan_mod, "ALIGN_FROM", 0)
    model = tiny_llama().model  # 4 query heads, 2 kv heads, head_dim 16
    m = gated(model, mean=5.0, std=0.0)
    with torch.no_grad():
        _close_two_pairs(m)  # q/k keep 12 of 16 dims
        for g in (0, 1):  # value dims 8-15 of both kv heads closed: m_v = 8
            m.gates["0-self_attn-v_proj"].rows.logits[16 * g + 8:16 * g + 16] = -5
    p = _one_block_plan(model, m)
    assert (p.m_qk, p.m_v, p.v_pad) == (12, 8, 4)
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    rep = m.report()
    info = compress.shrink(m)
    att = model.model.layers[0].self_attn
    assert att.v_pad == 4 and att.sizes == (48, 24, 24) and att.o_proj.weight.shape == (64, 4 * 8)
    assert att.qkv.weight.shape[0] % plan_mod.ROW_ALIGN == 0
    assert (forward(model, x, mask)[0] - ref)[mask.bool()].abs().max() < TOL
    # the padding is stored, and counted as stored
    assert info["params_dense"] - info["params_compressed"] == info["removed_cascade"] == rep["removed_cascade"]


def test_narrow_values_survive_save_and_load(monkeypatch, tmp_path):
    monkeypatch.setattr(plan_mod, "ALIGN_FROM", 0)
    loaded = tiny_llama()
    model = loaded.model
    m = gated(model, mean=5.0, std=0.0)
    with torch.no_grad():
        _close_two_pairs(m)
        m.gates["0-self_attn-v_proj"].rows.logits[4:16] = -5
        m.gates["0-self_attn-v_proj"].rows.logits[16 + 4:32] = -5
    x, mask = inputs()
    ref, _ = forward(model, x, mask)
    out = compress.save(model, loaded.tokenizer, tmp_path / "c", compress.shrink(m))
    assert json.loads((out / "compress.json").read_text())["layers"][0]["modules"]["self_attn"]["v_pad"] == 8
    again = compress.load(out)
    assert again.model.layers[0].self_attn.v_pad == 8
    assert (forward(again, x, mask)[0] - ref)[mask.bool()].abs().max() < TOL


def test_near_full_heads_keep_the_dense_width_and_compute_the_dense_attention_bit_for_bit(monkeypatch):
    monkeypatch.setattr(plan_mod, "ALIGN_FROM", 0)
    model = tiny_llama().model
    m = gated(model, mean=5.0, std=0.0)
    with torch.no_grad():
        m.gates["0-self_attn-k_proj"].rows.logits[[5, 13, 16 + 5, 16 + 13]] = -5  # pair 5 dead in both kv heads
        m.gates["0-self_attn-v_proj"].rows.logits[[3, 16 + 3]] = -5                # value dim 3 dead in both
    p = _one_block_plan(model, m)
    assert (p.m_qk, p.m_v, p.v_pad) == (16, 16, 0)  # 14 and 15 of 16 kept: more than 7/8, the whole head stays
    x = inputs()[0]
    with torch.no_grad():
        ref = model(input_ids=x).logits
        compress.shrink(m)
        out = model(input_ids=x).logits
    assert model.model.layers[0].self_attn.rope == "full"
    assert torch.equal(out, ref)


def test_a_reader_without_dead_columns_sums_in_the_blas_blocks_of_the_dense_weight():
    """A down_proj-sized reader with 35% of its columns gone: from as many input rows as the BLAS sums in
    blocks (8 or 16 seen) it is multiplied block by block as the BLAS sums the dense weight, and then equals
    the dense matmul bit for bit; batch-1 rows take one plain matmul (equal to rounding)."""
    from reftbench.compress import _compact
    from reftbench.compress.modules import dense_block
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 1536, generator=g)
    keep = torch.nonzero(torch.rand(1536, generator=g) >= 0.35).flatten().tolist()
    lin = _compact([(w.index_select(1, torch.tensor(keep)), None, list(range(96)))], None, None, len(keep), 96,
                   torch.float32, keep, 1536)
    assert lin.spec()["origin"] == len(keep) and lin.spec()["dense_in"] == 1536
    x = torch.zeros(2, 32, 1536)
    x[..., keep] = torch.randn(2, 32, len(keep), generator=g)
    with torch.no_grad():
        ref, out = torch.nn.functional.linear(x, w), lin(x[..., keep])
        one = lin(x[:1, :1, keep])
    assert torch.allclose(out, ref, atol=1e-4) and torch.allclose(one, ref[:1, :1], atol=1e-4)
    found = dense_block(96, 1536, False, torch.float32)
    if found is None:
        pytest.skip("this BLAS sums in no block found: the plain matmul is used")
    assert len(lin.blocks()) > 1 and torch.equal(out, ref)


def test_block_bounds_split_where_the_dense_column_crosses_a_block():
    from reftbench.compress.modules import _bounds
    assert _bounds([0, 5, 191, 192, 200, 500], 192) == [(0, 3), (3, 5), (5, 6)]
    assert _bounds([3, 4], 192) == [(0, 2)]


def test_no_dead_column_no_blocks():
    from reftbench.compress import _compact
    lin = _compact([(torch.randn(8, 300), None, list(range(8)))], None, None, 300, 8, torch.float32,
                   list(range(300)), 300)
    assert lin.origin is None and lin.blocks() == ()


def test_compact_decoder_layer_fuses_the_writers_into_the_residual_adds_bit_for_bit(tmp_path):
    """The decoder layers get the fused forward (o_proj's and down_proj's scatter folded into the residual
    adds): the same result as the layer's own forward over the same compact modules, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    loaded = tiny_llama()
    model = loaded.model
    m = gated(model, mean=5.0, std=0.0)
    with torch.no_grad():  # 8 of 64 residual rows closed in o_proj and down_proj: both scatter
        m.gates["0-self_attn-o_proj"].rows.logits[:8] = -5
        m.gates["0-mlp-down_proj"].rows.logits[20:28] = -5
        m.gates["0-mlp-up_proj"].rows.logits[:30] = -5
    x, mask = inputs()
    ref, ref_hidden = forward(model, x, mask)
    info = compress.shrink(m)
    block = model.model.layers[0]
    assert type(block).__name__ == "CompactLlamaDecoderLayer" and isinstance(block, LlamaDecoderLayer)
    assert block.self_attn.o_proj.out_index is not None and block.mlp.down_proj.out_index is not None
    logits, hidden = forward(model, x, mask)
    keep = mask.bool()
    assert (logits - ref)[keep].abs().max() < TOL
    assert all((a - b)[keep].abs().max() < TOL for a, b in zip(ref_hidden, hidden))
    h = torch.randn(2, 5, 64)
    emb = model.model.rotary_emb(h, torch.arange(5)[None])
    with torch.no_grad():
        plain = LlamaDecoderLayer.forward(block, h, position_embeddings=emb)
        assert torch.equal(block(h, position_embeddings=emb), plain)
    again = compress.load(compress.save(model, loaded.tokenizer, tmp_path / "c", info))
    assert all(type(b).__name__ == "CompactLlamaDecoderLayer" for b in again.model.layers)
    assert (forward(again, x, mask)[0] - ref)[keep].abs().max() < TOL
