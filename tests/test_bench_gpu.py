"""scripts/bench_gpu.py's --smoke mode: the GPU benchmark's every measurement, on a tiny model on the CPU."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_measures_every_method_and_inference(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--smoke", "--reps", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["model"] == "tiny-random-llama"
    assert [r["method"] for r in data["methods"]] == ["loreft", "lora", "dora", "red", "full"]
    trainable = {r["method"]: r["trainable"] for r in data["methods"]}
    assert trainable["red"] < trainable["loreft"] < trainable["lora"] < trainable["dora"] < trainable["full"]
    for r in data["methods"]:
        assert r["step_s"] > 0 and r["frozen_forward_s"] > 0 and r["peak_gib"] > 0
        assert r["step_over_frozen"] == r["step_s"] / r["frozen_forward_s"]
    inf = data["inference"]
    assert inf["forward_ratio"] > 0 and inf["gen_tok_s_plain"] > 0 and inf["gen_tok_s_loreft"] > 0
    printed = capsys.readouterr().out
    assert "step / frozen fwd" in printed and "intervened forward / plain forward" in printed
