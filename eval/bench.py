"""`vtoken bench`: speed of reducers on real architectures built from config with random weights.

- `vit`: images/s of a timm ViT (default ViT-B/16 at 224), unpatched and with ToMe r = 8 / 13 / 16,
  in one run (ToMe's classic setting).
- `vlm`: time to first token (vision + projector + prefill), decode tokens/s and peak memory of a
  LLaVA-1.5-shaped model, unreduced, per reducer and for the *oracle* (the same model fed an input
  that already has exactly `keep` visual tokens: the physical limit of a reducer at that budget).

Timings: CUDA events on GPU (after warm-up), `perf_counter` on CPU; the median of `--repeat` runs.
Results go to JSONL (one record per config) and a Markdown table. No download: weights are random
(speed does not depend on them, except content-adaptive merging such as DyMU).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import vtoken
from vtoken.eval.runner import environment


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def measure(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return measure


def median_time(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 2) -> float:
    measure = _timer(device)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        return statistics.median(measure(fn) for _ in range(repeat))


# --- ViT throughput ----------------------------------------------------------------------------------


def bench_vit(model_name: str = "vit_base_patch16_224", rs: tuple[int, ...] = (8, 13, 16), batch: int = 32,
              device: str = "cpu", dtype: torch.dtype = torch.float32, repeat: int = 10) -> list[dict[str, Any]]:
    import timm

    dev = torch.device(device)
    model = timm.create_model(model_name, pretrained=False).to(dev, dtype).eval()
    size = model.patch_embed.img_size
    x = torch.randn(batch, 3, *size, device=dev, dtype=dtype)
    records = []
    base = median_time(lambda: model(x), dev, repeat)
    records.append({"config": {"model": model_name, "reducer": "none", "batch": batch},
                    "metrics": {"images_per_s": batch / base, "seconds_per_batch": base, "speedup": 1.0}})
    for r in rs:
        with vtoken.patch(model, "tome", r=r) as p:
            t = median_time(lambda: model(x), dev, repeat)
            tokens = p.stats.vision_tokens[-1]
        records.append({"config": {"model": model_name, "reducer": "tome", "r": r, "batch": batch},
                        "metrics": {"images_per_s": batch / t, "seconds_per_batch": t, "speedup": base / t,
                                    "tokens_last_layer": tokens}})
    env = environment(dev, dtype)
    for rec in records:
        rec["environment"] = env
    return records


def vit_table(records: list[dict[str, Any]]) -> str:
    lines = ["| model | reducer | batch | images/s | speedup | tokens in last block |", "|---|---|---|---|---|---|"]
    for r in records:
        c, m = r["config"], r["metrics"]
        red = c["reducer"] + (f" r={c['r']}" if "r" in c else "")
        lines.append(f"| {c['model']} | {red} | {c['batch']} | {m['images_per_s']:.1f} | {m['speedup']:.2f}x "
                     f"| {m.get('tokens_last_layer', '-')} |")
    return "\n".join(lines)


def write(records: list[dict[str, Any]], out: str | None, table: str) -> None:
    print(table)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        path.with_suffix(".md").write_text(table + "\n")
        print(f"appended {len(records)} record(s) to {path}")
