"""Measure which reducers run on which model family (`python -m vtoken.eval.matrix`).

Each cell patches a tiny random model of the family, runs a batch of two samples (different image
sizes where the family allows it) through `generate`, and checks that the visual tokens reaching
the last LLM layer are fewer than with the `none` reducer (ViT families: that the tokens entering
the last block are fewer than the first). A refused combination shows the error class raised.
"""

from __future__ import annotations

import sys

import torch

import vtoken

REDUCERS = {"random": {"keep": 8}, "pool": {"keep": 8}, "fastv": {"keep": 8}, "hiprune": {"keep": 8},
            "visionzip": {"keep": 8}, "divprune": {"keep": 8}, "todre": {"keep": 8}, "transprune": {},
            "tome": {"r": 4}, "pitome": {"ratio": 0.8}, "dymu": {"thresholds": [0.2] * 32},
            "tome+vtu": {"r": 4, "vtu": "expand"}, "aim": {"keep": 0.5}, "holitom": {"keep": 0.3}}


def families():
    from vtoken.eval import tiny

    llava = tiny.tiny_llava()
    ids = [1, 5] + [tiny.IMAGE_TOKEN] * 36 + [7, 8, 9]
    yield "LLaVA-1.5", llava, {"input_ids": torch.tensor([ids, ids]), "pixel_values": torch.randn(2, 3, 84, 84)}
    nxt = tiny.tiny_llava_next()
    yield "LLaVA-NeXT", nxt, tiny.next_inputs(nxt, [[(60, 100)], [(90, 90)]])
    ov = tiny.tiny_llava_onevision()
    yield "LLaVA-OneVision", ov, tiny.onevision_inputs(ov, [[(60, 100)], [2]])  # an image; a 2-frame video
    for kind, label in (("qwen2_vl", "Qwen2-VL"), ("qwen2_5_vl", "Qwen2.5-VL"), ("qwen3_vl", "Qwen3-VL")):
        q = tiny.tiny_qwen(kind, vision_layers=3 if kind == "qwen3_vl" else 2)  # Qwen3-VL: 2 deepstack layers
        yield label, q, tiny.qwen_inputs([[(8, 12)], [(8, 8)]])


def _last_layer_tokens(model, inputs, name: str, params: dict) -> int:
    with vtoken.patch(model, name.split("+")[0], **params) as p, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        return sum(p.stats.visual_per_layer[-1])


def cell(model, inputs, name: str, params: dict, unreduced: int) -> str:
    try:
        tokens = _last_layer_tokens(model, inputs, name, params)
    except vtoken.VTokenError as e:
        return f"no ({type(e).__name__})"
    return "yes" if tokens < unreduced else "no (no reduction)"


def vit_cells() -> dict[str, dict[str, str]]:
    import open_clip
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64).eval()
    clip = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 64, "layers": 3, "width": 64, "patch_size": 16,
                                                    "head_width": 16},
                          text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2,
                                    "layers": 1}).eval()
    x = torch.randn(2, 3, 64, 64)
    out: dict[str, dict[str, str]] = {}
    for label, model, run in (("timm ViT", vit, vit), ("open_clip", clip, clip.encode_image)):
        row = {}
        for name, params in REDUCERS.items():
            try:
                with vtoken.patch(model, name.split("+")[0], **params) as p, torch.no_grad():
                    run(x)
                    row[name] = "yes" if p.stats.vision_tokens[-1] < p.stats.vision_tokens[0] else "no (no reduction)"
            except vtoken.VTokenError as e:
                row[name] = f"no ({type(e).__name__})"
        out[label] = row
    return out


def main() -> int:
    rows: dict[str, dict[str, str]] = {}
    for label, model, inputs in families():
        unreduced = _last_layer_tokens(model, inputs, "none", {})
        rows[label] = {name: cell(model, inputs, name, params, unreduced) for name, params in REDUCERS.items()}
    rows.update(vit_cells())
    names = list(REDUCERS)
    print("| model | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(row[n] for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
