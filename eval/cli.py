"""The `vtoken` command line: `vtoken run` (evaluate configs); more subcommands register here."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

DEMO_REDUCERS = ("random", "pool", "fastv", "hiprune", "visionzip", "divprune", "todre", "transprune")


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit code 2."""


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_params(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--param takes name=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _value(v.strip())
    return out


def _dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    import vtoken
    from vtoken.eval import models, runner
    from vtoken.reducers.base import build

    if args.task not in runner.TASKS:
        raise UsageError(f"unknown task {args.task!r}; available: {', '.join(runner.TASKS)}")
    if args.limit <= 0 or args.batch_size <= 0:
        raise UsageError("--limit and --batch-size must be positive")
    params = parse_params(args.param)
    if args.keep is not None:
        params["keep"] = args.keep
    demo = args.reducer is None
    names = list(DEMO_REDUCERS) if demo else [args.reducer]
    scale_keep = demo and "keep" not in params
    if scale_keep:
        params["keep"] = 64  # replaced below by this model's equivalent of 64 of 576 tokens
    per_reducer = {}
    for name in names:
        try:
            cls = vtoken.get(name)
            fields = {f.name for f in dataclasses.fields(cls)}
            per_reducer[name] = {k: v for k, v in params.items() if k in fields} if demo else params
            build(cls, per_reducer[name])  # validate the parameters before loading anything
        except vtoken.VTokenError as e:
            raise UsageError(str(e)) from None
    ref = args.model or models.default_model()
    try:
        model, proc, info = models.load(ref, device=args.device, dtype=_dtype(args.dtype))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UsageError(f"cannot load model {ref!r}: {e}") from None
    if scale_keep:
        keep, tokens = models.demo_keep(model)
        for name in names:
            if "keep" in per_reducer[name]:
                per_reducer[name]["keep"] = keep
        if tokens != 576:
            print(f"note: {ref} has {tokens} visual tokens per image: the demo keeps {keep} "
                  "(the equivalent of 64 of 576)", file=sys.stderr)
    torch.manual_seed(args.seed)
    if not info.get("trained", True):
        print(f"note: {ref} has random weights (no trained Shapes model in assets/): accuracy is chance level; "
              "tokens, FLOPs and latency are real.", file=sys.stderr)
    try:
        batches = runner.make_batches(proc, args.task, args.limit, args.batch_size, args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    common = dict(task=args.task, limit=args.limit, batch_size=args.batch_size, seed=args.seed, batches=batches)
    records = []
    reference = runner.evaluate(model, proc, "none", {}, **common) if not args.no_baseline else None
    if reference is not None:
        records.append(reference)
    for name in names:
        try:
            records.append(runner.evaluate(model, proc, name, per_reducer[name], **common))
        except vtoken.VTokenError as e:
            raise UsageError(f"{name}: {e}") from None
    if reference is not None:
        runner.compare(records, reference)
    for r in records:
        r["config"]["model"] = info.get("model", ref)
        r["config"]["model_trained"] = info.get("trained", True)
    print(runner.table(records))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for r in records if demo else records[-1:]:
                f.write(json.dumps(r) + "\n")
        print(f"appended {len(records) if demo else 1} record(s) to {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from vtoken.eval import calibrate, models

    try:
        model, proc, info = models.load(args.model, device=args.device, dtype=_dtype(args.dtype))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UsageError(f"cannot load model {args.model!r}: {e}") from None
    if args.images:
        try:
            images = calibrate.load_images(args.images, args.limit)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    else:
        images = calibrate.shapes_images(args.limit or 256)
    n_tokens = models.grid_tokens(model)
    if n_tokens is None:
        raise UsageError(f"calibrate needs a fixed-grid vision tower; {args.model!r} has no fixed image size")
    if args.preset is not None and args.preset not in calibrate.PRESETS and args.target is None:
        raise UsageError(f"unknown preset {args.preset!r}; use {', '.join(calibrate.PRESETS)} or give --target")
    if args.target is not None and not 0 < args.target <= n_tokens:
        raise UsageError(f"--target must be in 1..{n_tokens} (tokens per image)")
    result = calibrate.calibrate(model, images, calibrate.targets_for(n_tokens, args.target, args.preset), proc,
                                 batch_size=args.batch_size)
    calibrate.save(result, args.out, info.get("model", args.model))
    for name, entry in result.items():
        if "error" in entry:
            print(f"{name}: skipped: {entry['error']}", file=sys.stderr)
            continue
        print(f"{name}: target {entry['target']} tokens, {entry['mean_tokens']:.1f} on the {entry['images']} "
              f"calibration images")
    if all("error" in e for e in result.values()):
        raise UsageError("no preset could be calibrated for this model")
    print(f"wrote {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vtoken.eval import bench

    if args.target == "vit":
        records = bench.bench_vit(args.model or "vit_base_patch16_224", tuple(args.r), args.batch_size,
                                  args.device, _dtype(args.dtype), args.repeat)
        bench.write(records, args.out, bench.vit_table(records))
        return 0
    if args.target == "vlm" and args.compile:
        try:
            records = bench.bench_vlm_compile(
                args.model or "llava-small", tuple(args.reducer or bench.COMPILE_REDUCERS), tuple(args.keep or [64]),
                tuple(args.batch or [1]), args.device, _dtype(args.dtype), args.repeat, args.compile_mode)
        except (ValueError, vtoken_errors()) as e:
            raise UsageError(str(e)) from None
        bench.write(records, args.out, bench.compile_table(records))
        return 0
    if args.target == "vlm":
        try:
            records = bench.bench_vlm(args.model or "llava-small", tuple(args.reducer or bench.DEFAULT_REDUCERS),
                                      tuple(args.keep or [64]), tuple(args.batch or [1]), args.device,
                                      _dtype(args.dtype), args.repeat)
        except (ValueError, vtoken_errors()) as e:
            raise UsageError(str(e)) from None
        bench.write(records, args.out, bench.vlm_table(records))
        return 0
    raise UsageError(f"unknown bench target {args.target!r}")


def vtoken_errors() -> type[Exception]:
    import vtoken

    return vtoken.VTokenError


def cmd_sweep(args: argparse.Namespace) -> int:
    from vtoken.eval import sweep

    try:
        spec = sweep.load_spec(args.spec)
        configs = sweep.expand(spec)
    except (OSError, ValueError) as e:
        raise UsageError(f"bad sweep file {args.spec}: {e}") from None
    out = args.out or spec.get("out", "runs/sweep.jsonl")
    new = sweep.run_sweep(spec, out, args.executor)
    report = sweep.write_report(out)
    print(f"{len(configs)} configs, {len(new)} run now, results in {out}, tables in {report}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from vtoken.eval import plots

    try:
        records = plots.load(args.results)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {args.results}: {e}") from None
    out = plots.plot(records, args.out or str(Path(args.results).with_suffix(".png")))
    print(f"wrote {out}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from PIL import Image

    from vtoken.eval import models, viz

    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as e:
        raise UsageError(f"cannot open image {args.image}: {e}") from None
    model, proc, _ = models.load(args.model or models.default_model(), device=args.device)
    reducers = []
    for name in args.reducer or ["random", "fastv", "tome"]:
        reducers.append((name, {"keep": args.keep} if args.keep is not None else {}))
    try:
        panels = viz.visualize(model, proc, image, reducers, args.question)
    except Exception as e:  # a reducer that cannot run on this model: say which, no traceback
        raise UsageError(str(e)) from None
    viz.compose(panels).save(args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_export_shapes(args: argparse.Namespace) -> int:
    from vtoken.eval.lmms import export_task

    out = export_task(args.out, args.limit, args.seed)
    print(f"wrote the lmms-eval task vtoken_shapes ({args.limit} questions) to {out}; "
          f"use: lmms-eval --include_path {out} --tasks vtoken_shapes ...")
    return 0


LMMS_TASK_DIR = Path.home() / ".cache" / "vtoken" / "lmms_tasks" / "vtoken_shapes"


def cmd_lmms(args: argparse.Namespace, rest: list[str]) -> int:
    """Run lmms-eval with `--model vtoken` and offline defaults, then check that results were written."""
    import os
    import subprocess

    from vtoken.eval.lmms import export_task, find_results

    argv = list(rest)

    def has(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    if not has("--model"):
        argv += ["--model", "vtoken"]
    if not has("--tasks"):
        argv += ["--tasks", "vtoken_shapes"]
    tasks = argv[argv.index("--tasks") + 1] if "--tasks" in argv else ""
    if "vtoken_shapes" in tasks and not has("--include_path"):
        if not (LMMS_TASK_DIR / "data" / "test.parquet").exists():
            export_task(LMMS_TASK_DIR, limit=args.shapes_limit)
        argv += ["--include_path", str(LMMS_TASK_DIR)]
    if not has("--device"):
        argv += ["--device", "cpu"]
    if not has("--output_path"):
        argv += ["--output_path", "runs/lmms"]
    out = argv[argv.index("--output_path") + 1]
    before = find_results(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print("lmms-eval " + " ".join(argv))
    code = subprocess.run([sys.executable, "-m", "lmms_eval", *argv], env=env).returncode
    after = find_results(out)
    if code != 0 or after is None or after == before:  # lmms-eval exits 0 even when evaluation failed
        print("vtoken: error: lmms-eval wrote no results (see its output above)", file=sys.stderr)
        return 1
    print(f"results: {after}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vtoken", description="Visual token reduction for VLMs.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="evaluate a reducer config on a task (no arguments: the demo comparison)")
    run.add_argument("--model", help="model directory (save_pretrained), Hub id or a built-in random model "
                     "(tiny-llava-shapes, tiny-qwen2vl-shapes, tiny-qwen2.5vl-shapes, tiny-qwen3vl-shapes, "
                     "tiny-onevision-shapes); default: assets/llava-shapes if present")
    run.add_argument("--reducer", help="registered reducer name (default: the demo, every reducer at the "
                     "model's equivalent of keep 64 of 576 tokens)")
    run.add_argument("--keep", type=_value, help="budget: int tokens per image or float fraction")
    run.add_argument("--param", action="append", default=[], help="reducer parameter name=value (repeatable)")
    run.add_argument("--task", default="shapes")
    run.add_argument("--limit", type=int, default=200)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", default="fp32")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", help="append the JSON record(s) to this JSONL file")
    run.add_argument("--no-baseline", action="store_true", help="skip the unreduced reference run")
    run.set_defaults(func=cmd_run)
    cal = sub.add_parser("calibrate", help="DyMU per-layer merging thresholds for a model")
    cal.add_argument("--model", required=True, help="model directory or 'tiny-llava-shapes'")
    cal.add_argument("--images", help="folder of calibration images (default: Shapes training images)")
    cal.add_argument("--target", type=int, help="tokens per image to leave (default: presets low/mid/high)")
    cal.add_argument("--preset", help="preset name to store (low / mid / high, or a name for --target)")
    cal.add_argument("--limit", type=int, help="use at most this many images")
    cal.add_argument("--batch-size", type=int, default=16)
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="fp32")
    cal.add_argument("--out", required=True, help="JSON file to write")
    cal.set_defaults(func=cmd_calibrate)
    bn = sub.add_parser("bench", help="speed benchmarks on full-size architectures with random weights")
    bn.add_argument("target", choices=["vit", "vlm"],
                    help="vit: timm ViT images/s with ToMe; vlm: TTFT / decode / memory vs the oracle")
    bn.add_argument("--model", help="vit: timm model name (vit_base_patch16_224); vlm: llava-small, llava-1.5-7b")
    bn.add_argument("--reducer", action="append", help="vlm: reducer (repeatable)")
    bn.add_argument("--keep", type=int, action="append", help="vlm: budget (repeatable; default 64)")
    bn.add_argument("--batch", type=int, action="append", help="vlm: batch size (repeatable; default 1)")
    bn.add_argument("--r", type=int, nargs="+", default=[8, 13, 16], help="ToMe r values (vit)")
    bn.add_argument("--batch-size", type=int, default=32)
    bn.add_argument("--device", default="cpu")
    bn.add_argument("--dtype", default="fp32")
    bn.add_argument("--repeat", type=int, default=10)
    bn.add_argument("--compile", action="store_true",
                    help="vlm: TTFT eager and under torch.compile, each against the oracle run the same way (ABAB)")
    bn.add_argument("--compile-mode", default=None,
                    help="torch.compile mode with --compile (e.g. reduce-overhead: CUDA graphs; default: none)")
    bn.add_argument("--out", help="append JSONL records here (and write a .md table beside it)")
    bn.set_defaults(func=cmd_bench)
    sw = sub.add_parser("sweep", help="run a grid of configs from a YAML file (resumable)")
    sw.add_argument("spec", help="sweep YAML (see vtoken.eval.sweep)")
    sw.add_argument("--out", help="JSONL results file (default: the file's `out`)")
    sw.add_argument("--executor", choices=["local", "ray"], help="override the file's executor")
    sw.set_defaults(func=cmd_sweep)
    pl = sub.add_parser("plot", help="accuracy vs FLOPs, per-category and per-layer plots from a JSONL")
    pl.add_argument("results")
    pl.add_argument("-o", "--out", help="PNG file (default: beside the JSONL)")
    pl.set_defaults(func=cmd_plot)
    vz = sub.add_parser("viz", help="draw the tokens each reducer keeps / merges on an image")
    vz.add_argument("image")
    vz.add_argument("--model", help="model directory or tiny-llava-shapes (default: the shipped model)")
    vz.add_argument("--reducer", action="append", help="reducer name (repeatable; default random, fastv, tome)")
    vz.add_argument("--keep", type=_value, help="budget for every reducer")
    vz.add_argument("--question", default="what is in the image?")
    vz.add_argument("--device", default="cpu")
    vz.add_argument("-o", "--out", default="viz.png")
    vz.set_defaults(func=cmd_viz)
    ex = sub.add_parser("export-shapes", help="write the Shapes benchmark as an offline lmms-eval task")
    ex.add_argument("--out", required=True, help="task directory to create")
    ex.add_argument("--limit", type=int, default=200)
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=cmd_export_shapes)
    lm = sub.add_parser("lmms", help="lmms-eval with --model vtoken and offline defaults (other args pass through)")
    lm.add_argument("--shapes-limit", type=int, default=200, help="questions in the exported vtoken_shapes task")
    lm.set_defaults(func=cmd_lmms, passthrough=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["run"]
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        build_parser().parse_args(argv)  # reports the unknown arguments and exits 2
    try:
        if getattr(args, "passthrough", False):
            return args.func(args, rest)
        return args.func(args)
    except UsageError as e:
        print(f"vtoken: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
