"""CPU inference time of a model's forward on fixed batches: warm-up first, then the median of repeats."""
import statistics
import time

import torch


@torch.inference_mode()
def median_seconds(model, batches: list[dict], repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time of one pass of model(input_ids, attention_mask) over all `batches`."""
    def once():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(dense: float, compressed: float) -> dict:
    return {"dense_seconds": dense, "compressed_seconds": compressed, "speedup": dense / compressed,
            "time_reduction": 1.0 - compressed / dense}
