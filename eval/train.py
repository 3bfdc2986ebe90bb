"""Train the small Shapes VLMs shipped in assets/ (`python -m vtoken.eval.train --arch llava|qwen2vl`).

Recipe (built for one H100; runs anywhere, slowly):
- images: `--images` training scenes rendered once (all CPU cores) and kept on the device as uint8;
  preprocessing (normalisation, Qwen2-VL patchification) happens on the device;
- dense supervision: each sequence carries `--qa` questions about its image as successive turns
  ("USER: <image> q1 ASSISTANT: a1</s> USER: q2 ASSISTANT: a2</s> ..."), loss on the answers only;
  the questions are drawn fresh every step from the image's scene (all seven categories);
- AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA, gradient clipping;
- reproducible from `--seed` (data, initialisation, question sampling) and resumable: a checkpoint
  (model, optimiser, step, RNG) is written as safetensors shards of at most 16 MB under
  `OUT/checkpoint/`, so it can travel between machines in pieces; `--resume` continues from it;
- at the end: accuracy per category on `--eval` validation questions, the model saved (bf16) with
  its processor and `vtoken.json` (command, steps, minutes, accuracy) in OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vtoken.eval import models
from vtoken.eval.shapes import CATEGORIES, SIZE, _place, _question, render

SHARD_BYTES = 16 * 2**20
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- data --------------------------------------------------------------------------------------------


def _scene(args: tuple[int, int] | tuple[int, int, float | None]) -> tuple[np.ndarray, list]:
    """Training scene `i` from (seed, i[, text_p]): text_p is the chance that an object of radius >= 12
    carries a character (None or absent: 0.35, the benchmark's rate outside text questions)."""
    seed, i, *rest = args
    text_p = rest[0] if rest and rest[0] is not None else 0.35
    rng = np.random.default_rng([seed, 0, i, 10**6])  # the train split's stream, disjoint from sample()
    objs = []
    while not objs:
        objs = _place(rng, int(rng.integers(1, 10)), SIZE, text_p=text_p)
    return render(objs, rng, SIZE), objs


def render_pool(n: int, seed: int, workers: int | None = None) -> tuple[torch.Tensor, list[list]]:
    """n training scenes: (n, H, W, 3) uint8 images and their object lists."""
    with mp.get_context("fork").Pool(workers or mp.cpu_count()) as pool:
        out = pool.map(_scene, [(seed, i) for i in range(n)], chunksize=64)
    return torch.from_numpy(np.stack([o[0] for o in out])), [o[1] for o in out]


def pixels_llava(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIPImageProcessor output (B, 3, H, W) for 336x336 inputs."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
    return (x - mean) / std


def pixels_qwen(images: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> Qwen2VLImageProcessor patches (B * h * w, 3 * temporal * patch^2)."""
    x = pixels_llava(images)  # same normalisation constants
    b, c, hh, ww = x.shape
    gh, gw = hh // patch, ww // patch
    x = x[:, None].expand(b, temporal, c, hh, ww)  # a still image is repeated over the temporal patch
    x = x.reshape(b, 1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def make_batch(ids: torch.Tensor, objs: list[list], proc: Any, qa: int, rng: np.random.Generator,
               image_tokens: int) -> dict[str, torch.Tensor]:
    """Token ids and labels for a batch of images, `qa` question turns each (loss on answers only).

    The first turn is tokenised exactly as the processor does at evaluation (its chat template with
    the image placeholder expanded); later turns repeat the template without the image.
    """
    tok = proc.tokenizer
    placeholder = getattr(proc, "image_token", "<image>")
    seqs, labs = [], []
    for scene in (objs[i] for i in ids.tolist()):
        seq: list[int] = []
        lab: list[int] = []
        for turn in range(qa):
            qa_pair = None
            while qa_pair is None:
                cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
                qa_pair = _question(cat, scene, rng)
            text = models.prompt_text(proc, qa_pair[0])
            if turn == 0:
                text = text.replace(placeholder, placeholder * image_tokens)
                p_ids = tok(text)["input_ids"]
            else:
                p_ids = tok(text.replace(placeholder, ""), add_special_tokens=False)["input_ids"]
            a_ids = tok(qa_pair[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seq += p_ids + a_ids
            lab += [-100] * len(p_ids) + a_ids
        seqs.append(seq)
        labs.append(lab)
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# --- checkpoints -------------------------------------------------------------------------------------


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `_flat_optimizer`; with no tensors (only the model shards travelled) the optimiser
    starts afresh."""
    if not tensors:
        print("checkpoint has no optimiser shards; the optimiser starts afresh")
        return
    sd: dict[str, Any] = {"param_groups": meta["param_groups"], "state": {}}
    for pid, st in meta["state"].items():
        sd["state"][int(pid)] = dict(st)
    for name, t in tensors.items():
        pid, k = name.split(".", 1)
        sd["state"][int(pid)][k] = t
    opt.load_state_dict(sd)


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, prefix: str) -> list[str]:
    """safetensors shards of at most 16 MB each (a tensor larger than that is split along dim 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        pieces = [t] if t.numel() * t.element_size() <= SHARD_BYTES else list(
            t.split(max(1, SHARD_BYTES // max(t[0].numel() * t.element_size(), 1)), dim=0))
        for j, piece in enumerate(pieces):
            nbytes = piece.numel() * piece.element_size()
            if size + nbytes > SHARD_BYTES and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][name if len(pieces) == 1 else f"{name}@@{j}"] = piece.contiguous()
            size += nbytes
    files = []
    for i, shard in enumerate(shards):
        path = folder / f"{prefix}-{i:04d}.safetensors"
        save_file(shard, str(path))
        files.append(path.name)
    return files


def load_sharded(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    parts: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob(f"{prefix}-*.safetensors")):
        for name, t in load_file(str(path)).items():
            if "@@" in name:
                base, j = name.rsplit("@@", 1)
                parts.setdefault(base, {})[int(j)] = t
            else:
                out[name] = t
    for base, pieces in parts.items():
        out[base] = torch.cat([pieces[j] for j in sorted(pieces)])
    return out


def save_checkpoint(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                    rng: np.random.Generator, extra: dict[str, Any]) -> None:
    save_sharded(model.state_dict(), folder, "model")
    tensors, meta = _flat_optimizer(opt)
    save_sharded(tensors, folder, "optim")
    state = {"step": step, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state().tolist(),
             "optimizer": meta, **extra}
    (folder / "state.json").write_text(json.dumps(state))


def load_checkpoint(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    rng: np.random.Generator) -> int:
    model.load_state_dict(load_sharded(folder, "model"))
    state = json.loads((folder / "state.json").read_text())
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    tensors = load_sharded(folder, "optim")
    load_optimizer(opt, tensors, state["optimizer"])
    return int(state["step"])


# --- training ----------------------------------------------------------------------------------------


def build(arch: str, size: str) -> tuple[torch.nn.Module, Any, int]:
    """(model, processor, image tokens per image) for an architecture and a size preset."""
    dims = {"tiny": ((2, 64, 4), (2, 64, 4, 2)), "small": ((6, 384, 6), (4, 384, 6, 2))}[size]
    if arch == "llava":
        from transformers import LlavaForConditionalGeneration

        proc = models.build_processor()
        cfg = models.shapes_config(len(proc.tokenizer), proc.tokenizer.convert_tokens_to_ids("<image>"), *dims)
        return LlavaForConditionalGeneration(cfg), proc, (SIZE // 14) ** 2
    from transformers import Qwen2VLForConditionalGeneration

    proc = models.build_qwen_processor()
    cfg = models.qwen_config(len(proc.tokenizer), proc.tokenizer, *dims)
    return Qwen2VLForConditionalGeneration(cfg), proc, (SIZE // 28) ** 2


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    out = Path(args.out)
    ckpt = out / "checkpoint"
    torch.manual_seed(args.seed)
    model, proc, image_tokens = build(args.arch, args.size)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    rng = np.random.default_rng(args.seed)
    step = 0
    if args.resume and (ckpt / "state.json").exists():
        step = load_checkpoint(ckpt, model, opt, rng)
        print(f"resumed from {ckpt} at step {step}")
    t0 = time.time()
    images, objs = render_pool(args.images, args.seed, args.workers)
    print(f"rendered {args.images} scenes in {time.time() - t0:.1f}s")
    images = images.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    start, losses = time.time(), []
    while step < args.steps and (time.time() - start) < args.minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        ids = torch.from_numpy(rng.integers(0, len(objs), args.batch))
        batch = {k: v.to(device) for k, v in make_batch(ids, objs, proc, args.qa, rng, image_tokens).items()}
        px = images[ids.to(device)]
        if args.arch == "llava":
            batch["pixel_values"] = pixels_llava(px)
        else:
            batch["pixel_values"] = pixels_qwen(px)
            g = SIZE // 14
            batch["image_grid_thw"] = torch.tensor([[1, g, g]] * len(ids), device=device)
            batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
        with autocast:
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.detach())
        if step % args.log_every == 0:  # the only host sync of the loop
            recent = torch.stack(losses[-args.log_every:]).float().mean().item()
            print(f"step {step} loss {recent:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{(time.time() - start) / 60:.1f} min", flush=True)
        if step % args.save_every == 0:
            save_checkpoint(ckpt, model, opt, step, rng, {"arch": args.arch, "size": args.size})
    save_checkpoint(ckpt, model, opt, step, rng, {"arch": args.arch, "size": args.size})
    minutes = (time.time() - start) / 60
    final = float(losses[-1]) if losses else None
    result: dict[str, Any] = {"steps": step, "minutes": round(minutes, 2), "final_loss": final,
                              "command": "python -m vtoken.eval.train " + " ".join(sys.argv[1:])}
    if args.eval:
        from vtoken.eval import runner

        model.eval()
        batches = runner.make_batches(proc, "shapes", args.eval, 32, seed=args.seed, split="val")
        rec = runner.evaluate(model, proc, "none", {}, batches=batches, timing_batches=0, progress=False)
        result["val_accuracy"] = rec["metrics"]["accuracy"]
        result["val_per_category"] = rec["metrics"]["per_category"]
        print(json.dumps(result, indent=1))
    model.to(torch.bfloat16).save_pretrained(out)
    proc.save_pretrained(out)
    (out / "vtoken.json").write_text(json.dumps({"arch": args.arch, **result}, indent=1))
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vtoken.eval.train", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=models.ARCHS, required=True)
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--qa", type=int, default=4, help="question turns per image and sequence")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--minutes", type=float, default=9.0, help="stop after this much training time (resume later)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval", type=int, default=700, help="validation questions at the end (0: none)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=1000)
    return ap.parse_args(argv)


if __name__ == "__main__":
    train(parse())
