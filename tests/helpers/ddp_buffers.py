"""Under `accelerate launch` with 2 processes (gloo on the CPU): the module DDP wraps for training
syncs no buffers on its forwards, and LoReFT's constant d x d bases are not in any state_dict.
Writes `ok` to the file given when every check passed on every process."""
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import method_cfg, tiny_llama  # noqa: E402
from reftbench import methods  # noqa: E402
from reftbench.data import collate_train, encode_example  # noqa: E402
from reftbench.train import Step, answer_loss, make_accelerator  # noqa: E402


def main(out: Path):
    acc = make_accelerator("fp32", "cpu")
    llama = tiny_llama(layers=2)
    torch.manual_seed(0)
    method = methods.build(method_cfg(rank=2, positions="f1+l1"), llama.model)
    prepared = acc.prepare(Step(llama.model, method, answer_loss))
    assert acc.num_processes == 2 and isinstance(prepared, DistributedDataParallel), type(prepared)
    bases = [n for n, _ in prepared.named_buffers() if n.endswith("rotation.base")]
    assert bases, "LoReFT's bases are buffers of the wrapped module"
    assert prepared.broadcast_buffers is False and not prepared.will_sync_module_buffers()
    assert not any(k.endswith(".base") for k in prepared.state_dict())
    batch = collate_train([encode_example(llama.tokenizer, f"{acc.process_index}+1=", " 2", 16)], llama.tokenizer.pad_token_id)
    with method.context(batch):
        acc.backward(prepared(batch))  # a synced forward and backward go through without a buffer broadcast
    acc.wait_for_everyone()
    if acc.is_main_process:
        out.write_text("ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
