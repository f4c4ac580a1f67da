#!/usr/bin/env python
"""Resident memory right after loading a model and reading its whole (tied) embedding once, with the
dedicated pad token's resize (`pad`, what a run does) or without it (`nopad`: EOS pads, no resize).

    PYTHONPATH=src python scripts/rss_after_load.py pad
    PYTHONPATH=src python scripts/rss_after_load.py nopad
"""
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from reftbench import models
from reftbench.record import PeakRSS, release_freed_memory


def status() -> str:
    text = open("/proc/self/status").read()
    kib = {k: int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("RssAnon", "RssFile")}
    return ", ".join(f"{k} {v / 2**20:.3f} GiB" for k, v in kib.items())


def main(mode: str, model: str = "smollm2-135m"):
    if mode == "nopad":
        def eos_pads(m, tok, kind):
            tok.pad_token = tok.eos_token
            return tok.pad_token_id
        models.set_padding = eos_pads
    loaded = models.load(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{model}.yaml"))
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.sum()  # as the LM head of a step reads it
    release_freed_memory()
    print(f"{mode}: RSS {PeakRSS.current() / 2**30:.3f} GiB ({status()})")


if __name__ == "__main__":
    main(*sys.argv[1:])
