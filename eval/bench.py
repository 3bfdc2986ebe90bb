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


# --- VLM time to first token, decode speed, memory, with the oracle ---------------------------------


COMPILE_REDUCERS = ("random", "hiprune", "fastv", "visionzip")
DEFAULT_REDUCERS = ("random", "pool", "fastv", "hiprune", "visionzip", "divprune", "todre", "transprune")


def build_vlm(arch: str, dtype: torch.dtype, device: torch.device, attn: str = "sdpa") -> tuple[Any, dict[str, Any]]:
    """A named architecture with random weights (no download) and the geometry of its inputs."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    def llava(v: tuple[int, int, int, int], t: tuple[int, int, int, int, int]) -> Any:
        vl, vd, vh, vm = v
        tl, td, th, tkv, tm = t
        vc = CLIPVisionConfig(hidden_size=vd, intermediate_size=vm, num_hidden_layers=vl, num_attention_heads=vh,
                              image_size=336, patch_size=14, projection_dim=768)
        tc = LlamaConfig(hidden_size=td, intermediate_size=tm, num_hidden_layers=tl, num_attention_heads=th,
                         num_key_value_heads=tkv, vocab_size=32064, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=0)
        cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=32000, projector_hidden_act="gelu",
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        for c in (cfg, cfg.text_config, cfg.vision_config):
            c._attn_implementation = attn
        with torch.device(device):
            return LlavaForConditionalGeneration(cfg).to(dtype).eval()

    if arch == "llava-1.5-7b":  # CLIP ViT-L/14-336 + Vicuna-7B
        return llava((24, 1024, 16, 4096), (32, 4096, 32, 32, 11008)), {"visual": 576, "text": 40, "image": 336}
    if arch == "llava-small":  # BENCHMARKS.md §3: CLIP 336/14 6 layers 256-d, LLM 4 layers 512-d
        return llava((6, 256, 4, 1024), (4, 512, 8, 8, 1376)), {"visual": 576, "text": 40, "image": 336}
    raise ValueError(f"unknown architecture {arch!r}; vlm: llava-1.5-7b, llava-small")


def _vlm_inputs(model: Any, geo: dict[str, Any], batch: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 30000, (batch, geo["text"]), generator=g)
    image = torch.full((batch, geo["visual"]), model.config.image_token_id)
    ids = torch.cat([text[:, :5], image, text[:, 5:]], 1).to(device)
    px = torch.randn(batch, 3, geo["image"], geo["image"], generator=g).to(device, dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px}


def bench_vlm(arch: str = "llava-small", reducers: tuple[str, ...] = ("random", "pool", "fastv", "hiprune",
              "divprune", "todre"), keeps: tuple[int, ...] = (64,), batches: tuple[int, ...] = (1,),
              device: str = "cpu", dtype: torch.dtype = torch.float32, repeat: int = 5,
              decode_tokens: int = 8) -> list[dict[str, Any]]:
    """Eager-mode TTFT / decode / memory for the unreduced model, each reducer and the oracle."""
    dev = torch.device(device)
    model, geo = build_vlm(arch, dtype, dev)
    env = environment(dev, dtype)
    records: list[dict[str, Any]] = []

    def peak() -> float | None:
        return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None

    def reset() -> None:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

    for b in batches:
        inputs = _vlm_inputs(model, geo, b, dev, dtype)

        def prefill(inputs: dict[str, torch.Tensor] = inputs) -> Any:
            return model(**inputs, logits_to_keep=1)

        def decode(inputs: dict[str, torch.Tensor] = inputs) -> Any:
            return model.generate(**inputs, max_new_tokens=1 + decode_tokens, min_new_tokens=1 + decode_tokens,
                                  do_sample=False, pad_token_id=0)

        reset()
        base = median_time(prefill, dev, repeat)
        base_dec = median_time(decode, dev, max(2, repeat // 2))
        records.append(_vlm_record(arch, b, "none", None, base, base, base, base_dec, decode_tokens, None, peak()))
        for k in keeps:
            oracle = _oracle_time(model, inputs, geo, k, dev, repeat)
            for name in reducers:
                with vtoken.patch(model, name, keep=k) as p:
                    reset()
                    t = median_time(prefill, dev, repeat)
                    overhead = _overhead(p, prefill)
                    t_dec = median_time(decode, dev, max(2, repeat // 2))
                records.append(_vlm_record(arch, b, name, k, t, base, oracle, t_dec, decode_tokens, overhead, peak()))
    for r in records:
        r["environment"] = env
    return records


def _oracle_time(model: Any, inputs: dict[str, torch.Tensor], geo: dict[str, Any], keep: int, dev: torch.device,
                 repeat: int) -> float:
    """The same model on an input that already has exactly `keep` visual tokens per image: the vision
    tower and projector on the image, then the LLM prefill of the text plus `keep` visual rows."""
    with torch.no_grad():
        feats = torch.stack(list(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
        embed = model.get_input_embeddings()(inputs["input_ids"])
        img = inputs["input_ids"] == model.config.image_token_id
        text_before = embed[:, : int(img[0].nonzero()[0])]
        text_after = embed[:, int(img[0].nonzero()[-1]) + 1:]
        short = torch.cat([text_before, feats[:, :keep].to(embed.dtype), text_after], 1)
    mask = torch.ones(short.shape[:2], dtype=torch.long, device=dev)

    def run() -> None:
        model.get_image_features(pixel_values=inputs["pixel_values"])
        model(inputs_embeds=short, attention_mask=mask, logits_to_keep=1)

    return median_time(run, dev, repeat)


def bench_vlm_compile(arch: str = "llava-small", reducers: tuple[str, ...] = ("random", "hiprune", "fastv"),
                      keeps: tuple[int, ...] = (64,), batches: tuple[int, ...] = (1,), device: str = "cpu",
                      dtype: torch.dtype = torch.float32, repeat: int = 10,
                      mode: str | None = None) -> list[dict[str, Any]]:
    """TTFT of each reducer eager and under torch.compile (`mode`, e.g. "reduce-overhead" for CUDA
    graphs), each against the oracle run the same way. Oracle and reducer calls alternate (ABAB) so that
    a noisy moment hits both; the ratio is the median of the per-pair ratios."""
    import copy

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    dev = torch.device(device)
    model, geo = build_vlm(arch, dtype, dev)
    oracle_model = copy.deepcopy(model)  # never patched: the oracle must not pass vtoken's hooks
    env = environment(dev, dtype)
    measure = _timer(dev)
    records: list[dict[str, Any]] = []
    for b in batches:
        inputs = _vlm_inputs(model, geo, b, dev, dtype)
        for k in keeps:
            oracle = _oracle_fn(oracle_model, inputs, k, dev)
            oracles = {"eager": oracle, "compiled": torch.compile(oracle, mode=mode)}
            for name in reducers:
                with vtoken.patch(model, name, keep=k):
                    runs = {"eager": model, "compiled": torch.compile(model, mode=mode)}
                    for how, m in runs.items():
                        def prefill(m: Any = m, inputs: dict[str, torch.Tensor] = inputs) -> Any:
                            return m(**inputs, logits_to_keep=1)

                        pairs = _interleaved(oracles[how], prefill, measure, repeat)
                        records.append(_compile_record(arch, b, name, k, how, mode, pairs))
    for r in records:
        r["environment"] = env
    return records


def _oracle_fn(model: Any, inputs: dict[str, torch.Tensor], keep: int, dev: torch.device) -> Callable[[], Any]:
    """The oracle's TTFT as one function (vision tower + projector, then the LLM on `keep` visual rows)."""
    with torch.no_grad():
        embed = model.get_input_embeddings()(inputs["input_ids"])
        img = (inputs["input_ids"] == model.config.image_token_id)[0]
        first, last = int(img.nonzero()[0]), int(img.nonzero()[-1])
    before, after = embed[:, :first], embed[:, last + 1:]
    mask = torch.ones(embed.shape[0], first + keep + after.shape[1], dtype=torch.long, device=dev)
    pixels = inputs["pixel_values"]

    def run() -> Any:
        feats = torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))
        short = torch.cat([before, feats[:, :keep].to(before.dtype), after], 1)
        return model(inputs_embeds=short, attention_mask=mask, logits_to_keep=1)

    return run


def _interleaved(a: Callable[[], Any], b: Callable[[], Any], measure: Callable[[Callable[[], Any]], float],
                 repeat: int, warmup: int = 3) -> list[tuple[float, float]]:
    """(time of a, time of b) for `repeat` alternating pairs, after `warmup` of each (compilation)."""
    with torch.no_grad():
        for _ in range(warmup):
            a()
            b()
        return [(measure(a), measure(b)) for _ in range(repeat)]


def _compile_record(arch: str, batch: int, reducer: str, keep: int, how: str, mode: str | None,
                    pairs: list[tuple[float, float]]) -> dict[str, Any]:
    oracle = statistics.median(o for o, _ in pairs)
    t = statistics.median(r for _, r in pairs)
    ratios = sorted(r / o for o, r in pairs)
    return {
        "config": {"arch": arch, "batch": batch, "reducer": reducer, "keep": keep, "mode": how,
                   "compile_mode": mode if how == "compiled" else None},
        "metrics": {"ttft_ms": 1e3 * t, "oracle_ttft_ms": 1e3 * oracle,
                    "ratio_to_oracle": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
                    "pairs": len(pairs)},
    }


def compile_table(records: list[dict[str, Any]]) -> str:
    lines = ["| arch | batch | reducer | keep | mode | TTFT ms | oracle TTFT ms | TTFT / oracle (median of pairs) "
             "| min-max over pairs |", "|---" * 9 + "|"]
    for r in records:
        c, m = r["config"], r["metrics"]
        how = c["mode"] if c["compile_mode"] is None else f"compiled ({c['compile_mode']})"
        lines.append(f"| {c['arch']} | {c['batch']} | {c['reducer']} | {c['keep']} | {how} | {m['ttft_ms']:.1f} "
                     f"| {m['oracle_ttft_ms']:.1f} | {m['ratio_to_oracle']:.2f} | {m['ratio_min']:.2f}-"
                     f"{m['ratio_max']:.2f} |")
    return "\n".join(lines)


def _overhead(p: vtoken.Patch, prefill: Callable[[], Any]) -> float:
    with torch.no_grad():
        prefill()
    return p.stats.overhead_s


def _vlm_record(arch: str, batch: int, reducer: str, keep: int | None, t: float, base: float, oracle: float,
                t_dec: float, n_dec: int, overhead: float | None, mem: float | None) -> dict[str, Any]:
    decode_s = max(t_dec - t, 1e-9)
    return {
        "config": {"arch": arch, "batch": batch, "reducer": reducer, "keep": keep, "mode": "eager"},
        "metrics": {"ttft_ms": 1e3 * t, "speedup": base / t, "oracle_ttft_ms": 1e3 * oracle,
                    "ratio_to_oracle": t / oracle, "oracle_speedup": base / oracle,
                    "decode_tokens_per_s": n_dec * batch / decode_s,
                    "overhead_pct_of_unreduced_ttft": None if overhead is None else 100 * overhead / base,
                    "peak_memory_mb": mem},
    }


def vlm_table(records: list[dict[str, Any]]) -> str:
    lines = ["| arch | batch | reducer | keep | TTFT ms | speedup | oracle TTFT ms | ratio to oracle "
             "| reducer overhead % | decode tok/s | peak MB |", "|---" * 11 + "|"]
    for r in records:
        c, m = r["config"], r["metrics"]
        oh = "-" if m["overhead_pct_of_unreduced_ttft"] is None else f"{m['overhead_pct_of_unreduced_ttft']:.2f}"
        mem = "-" if m["peak_memory_mb"] is None else f"{m['peak_memory_mb']:.0f}"
        lines.append(f"| {c['arch']} | {c['batch']} | {c['reducer']} | {c['keep'] or '-'} | {m['ttft_ms']:.1f} "
                     f"| {m['speedup']:.2f}x | {m['oracle_ttft_ms']:.1f} | {m['ratio_to_oracle']:.2f} | {oh} "
                     f"| {m['decode_tokens_per_s']:.0f} | {mem} |")
    return "\n".join(lines)
