"""Evaluate one model + reducer config: accuracy (overall, per category), tokens, FLOPs, latency, memory.

`evaluate()` returns one JSON-serialisable record; `vtoken run` prints it as a table and appends it
to a JSONL file. The unreduced model is run in the same process (as the `none` reducer, which keeps
every token and is bit-identical to the unpatched model) so "% retained" and "FLOPs %" are ratios
taken side by side.
"""

from __future__ import annotations

import platform
import resource
import statistics
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from tqdm.auto import tqdm

import vtoken
from vtoken.eval.models import prompt_text
from vtoken.eval.shapes import CATEGORIES, ShapesVideoQA, ShapesVQA

TASKS = ("shapes", "shapes-video")  # shapes-video: moving shapes, 4 frames (models with video inputs: Qwen2-VL)


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    answers: list[str]
    categories: list[str]


def bootstrap_ci(ok: Sequence[bool], reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the accuracy (the mean of `ok`): the questions are resampled
    with replacement `reps` times (seeded, so a record is reproducible)."""
    if not ok:
        return 0.0, 0.0
    x = torch.tensor([float(v) for v in ok], dtype=torch.float64)
    idx = torch.randint(len(x), (reps, len(x)), generator=torch.Generator().manual_seed(seed))
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(x[idx].mean(1), tails).tolist()
    return lo, hi


def make_batches(processor: Any, task: str = "shapes", limit: int = 200, batch_size: int = 8, seed: int = 0,
                 split: str = "test") -> list[Batch]:
    """Tokenised batches of the task's first `limit` questions (built once, reused across configs)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    video = task == "shapes-video"
    if video and getattr(processor, "video_processor", None) is None:
        raise ValueError("the shapes-video task needs a model whose processor takes videos (a Qwen2-VL Shapes "
                         "model, e.g. --model tiny-qwen2vl-shapes)")
    ds = ShapesVideoQA(split, n=limit, seed=seed) if video else ShapesVQA(split, n=limit, seed=seed)
    out = []
    for i in range(0, limit, batch_size):
        items = [ds[j] for j in range(i, min(limit, i + batch_size))]
        media = ({"videos": [list(s.frames) for s in items]} if video
                 else {"images": [Image.fromarray(s.image) for s in items]})
        inputs = processor(
            **media,
            text=[prompt_text(processor, s.question, "video" if video else "image") for s in items],
            return_tensors="pt", padding=True,
        )
        out.append(Batch(dict(inputs), [s.answer for s in items], [s.category for s in items]))
    return out


def _to(inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A batch on the model's device, its pixels (images or videos) in the model's dtype."""
    out = {k: v.to(device) for k, v in inputs.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in out:
            out[key] = out[key].to(dtype)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model: Any, inputs: dict[str, torch.Tensor], new: int) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=model.config.text_config.pad_token_id)


@torch.no_grad()
def evaluate(
    model: Any,
    processor: Any,
    reducer: str | vtoken.Reducer | Sequence[str | vtoken.Reducer] | None = "none",
    params: dict[str, Any] | None = None,
    task: str = "shapes",
    limit: int = 200,
    batch_size: int = 8,
    seed: int = 0,
    batches: list[Batch] | None = None,
    timing_batches: int = 2,
    decode_tokens: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `task` on `model` patched with `reducer` and return the record (see module docstring)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batches = batches if batches is not None else make_batches(processor, task, limit, batch_size, seed)
    name = reducer if isinstance(reducer, str) else getattr(reducer, "name", str(reducer))
    correct: dict[str, list[bool]] = defaultdict(list)
    tokens: list[int] = []
    per_layer: list[list[int]] = []  # per LLM layer, visual tokens of every sample
    flops: dict[str, float] = defaultdict(float)
    overhead = 0.0
    n = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tok = processor.tokenizer
    with vtoken.patch(model, reducer, **(params or {})) as patch:
        described = patch.describe()
        for b in tqdm(batches, desc=f"{name}", disable=not progress, leave=False):
            inputs = _to(b.inputs, device, dtype)
            out = _generate(model, inputs, 1)
            preds = tok.batch_decode(out[:, -1:], skip_special_tokens=True)
            for p, a, c in zip(preds, b.answers, b.categories):
                correct[c].append(p.strip() == a)
            st = patch.stats
            tokens += st.visual_tokens
            for i, layer in enumerate(st.visual_per_layer):
                if i == len(per_layer):
                    per_layer.append([])
                per_layer[i] += layer
            for k, v in st.flops.items():
                flops[k] += v
            overhead += st.overhead_s
            n += len(b.answers)
        ttft, tps = _timing(model, batches[:timing_batches], device, dtype, decode_tokens)
    all_ok = [x for v in correct.values() for x in v]
    record = {
        "config": {"reducer": name, "params": params or {}, "task": task, "limit": n, "batch_size": batch_size,
                   "seed": seed, "describe": described},
        "metrics": {
            "accuracy": sum(all_ok) / max(len(all_ok), 1),
            "accuracy_ci95": bootstrap_ci(all_ok),
            "per_category": {c: sum(v) / len(v) for c in CATEGORIES if (v := correct.get(c))},
            "visual_tokens": {"mean": statistics.fmean(tokens) if tokens else 0.0,
                              "min": min(tokens, default=0), "max": max(tokens, default=0)},
            "visual_tokens_per_layer": [statistics.fmean(x) if x else 0.0 for x in per_layer],
            "flops_per_sample": {k: v / max(n, 1) for k, v in flops.items()},
            "ttft_ms": ttft,
            "decode_tokens_per_s": tps,
            "reducer_overhead_ms_per_sample": 1e3 * overhead / max(n, 1),
            "peak_memory_mb": _peak_memory(device),
        },
        "environment": environment(device, dtype),
    }
    return record


def _timing(model: Any, batches: list[Batch], device: torch.device, dtype: torch.dtype,
            decode_tokens: int) -> tuple[float | None, float | None]:
    """Median time to first token (ms per batch) and decode tokens/s over `decode_tokens` tokens."""
    if not batches:
        return None, None
    firsts, rates = [], []
    for b in batches:
        inputs = _to(b.inputs, device, dtype)
        _generate(model, inputs, 1)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        _generate(model, inputs, 1)
        _sync(device)
        t1 = time.perf_counter()
        _generate(model, inputs, 1 + decode_tokens)
        _sync(device)
        t2 = time.perf_counter()
        firsts.append(1e3 * (t1 - t0))
        decode = (t2 - t1) - (t1 - t0)
        if decode > 0:
            rates.append(decode_tokens * len(b.answers) / decode)
    return statistics.median(firsts), (statistics.median(rates) if rates else None)


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "vtoken": vtoken.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": f"{device.type}: {name}", "dtype": str(dtype).split(".")[-1],
        "threads": torch.get_num_threads(), "git_commit": commit,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def compare(records: list[dict[str, Any]], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """Add "retained_pct" (accuracy % of the reference) and "flops_pct" (total FLOPs % of the reference)."""
    ref_acc = reference["metrics"]["accuracy"]
    ref_flops = reference["metrics"]["flops_per_sample"].get("total", 0.0)
    for r in records:
        m = r["metrics"]
        m["retained_pct"] = 100 * m["accuracy"] / ref_acc if ref_acc else None
        m["flops_pct"] = 100 * m["flops_per_sample"].get("total", 0.0) / ref_flops if ref_flops else None
        m["reference_accuracy"] = ref_acc
    return records


def table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of the records (one row per config)."""
    head = ("| reducer | params | acc % (95% CI) | retained % | visual tokens (mean/min/max) | FLOPs % | TTFT ms "
            "| decode tok/s | overhead ms/sample |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        m, c = r["metrics"], r["config"]
        vt = m["visual_tokens"]
        params = _params(c)
        lines.append(
            f"| {c['reducer']} | {params} | {100 * m['accuracy']:.1f}{_ci(m.get('accuracy_ci95'))} "
            f"| {_fmt(m.get('retained_pct'))} "
            f"| {vt['mean']:.1f} / {vt['min']} / {vt['max']} | {_fmt(m.get('flops_pct'))} | {_fmt(m['ttft_ms'])} "
            f"| {_fmt(m['decode_tokens_per_s'])} | {m['reducer_overhead_ms_per_sample']:.2f} |"
        )
    return "\n".join(lines)


def category_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of accuracy per question category (one row per config)."""
    cats = [c for c in CATEGORIES if any(c in r["metrics"]["per_category"] for r in records)]
    lines = ["| reducer | params | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
    for r in records:
        c, per = r["config"], r["metrics"]["per_category"]
        params = _params(c)
        cells = " | ".join(_fmt(100 * per[k]) if k in per else "-" for k in cats)
        lines.append(f"| {c['reducer']} | {params} | {cells} |")
    return "\n".join(lines)


def _params(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config["params"].items()) or "-"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
