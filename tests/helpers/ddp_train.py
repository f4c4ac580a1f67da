"""Train several methods with the loop and save their trained tensors: run once in a single process,
and under `torchrun --nproc_per_node 2` (gloo on the CPU), by tests/test_ddp.py."""
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import method_cfg, tiny_llama  # noqa: E402
from reftbench import methods  # noqa: E402
from reftbench.data import collate_train, encode_example  # noqa: E402
from reftbench.train import make_accelerator, train  # noqa: E402

CASES = {"loreft": method_cfg(rank=2, positions="f1+l2"), "lora": {"name": "lora", "rank": 2, "dropout": 0.0},
         "dora": {"name": "dora", "rank": 2, "dropout": 0.0}, "red": {"name": "red"}, "full": {"name": "full"}}


def run(out: Path, names, checkpointing=False, grad_accum=2):
    acc = make_accelerator("fp32", "cpu")
    result = {}
    for name in names:
        llama = tiny_llama(layers=2)
        tok = llama.tokenizer
        # prompts of different lengths (ReFT's positions differ per row) and answers of 2 to 5 tokens:
        # the processes' halves of a batch hold different numbers of answer tokens, which the loss
        # must weight as one process does
        exs = [encode_example(tok, f"{a}+{a % 3}=", f" {a ** 3 if a % 3 else a % 10}", 64) for a in range(5, 17)]
        torch.manual_seed(0)
        m = methods.build(CASES[name], llama.model)
        cfg = OmegaConf.create(dict(epochs=1, max_steps=None, lr=1e-2 if name != "full" else 1e-3, batch_size=4,
                                    grad_accum=grad_accum, weight_decay=0.0, warmup_ratio=0.0, max_length=64, max_grad_norm=1.0,
                                    precision="fp32", base_dropout=True, checkpoints=False,
                                    gradient_checkpointing=checkpointing))
        stats = train(llama.model, m, exs, cfg, lambda b: collate_train(b, tok.pad_token_id), accelerator=acc)
        assert stats["steps"] == -(-len(exs) // 4 // grad_accum) and stats["processes"] == acc.num_processes
        for i, p in enumerate(m.trainable_parameters()):
            result[f"{name}.{i}"] = p.detach().contiguous().clone()
    if acc.is_main_process:
        save_file(result, str(out), metadata={"processes": str(acc.num_processes)})
    acc.wait_for_everyone()


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2].split(","), checkpointing="ckpt" in sys.argv[3:],
        grad_accum=1 if "noaccum" in sys.argv[3:] else 2)
