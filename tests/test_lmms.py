"""lmms-eval plugin end to end, offline, on saved tiny Shapes models (one per lmms-eval wrapper)."""

from __future__ import annotations

import functools
import inspect
import io
import json
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from vtoken.eval.lmms import export_task, find_results
from vtoken.eval.models import tiny_onevision_shapes_model, tiny_qwen_shapes_model, tiny_shapes_model
from vtoken.eval.shapes import SIZE

# the Shapes geometry (336 px) for the wrappers whose default min_pixels (256 * 28 * 28) would upscale it
SHAPES_PIXELS = {"min_pixels": SIZE * SIZE, "max_pixels": SIZE * SIZE}
MODELS = {  # folder: (builder, lmms-eval model, its extra model args)
    "llava": (tiny_shapes_model, "llava_hf", {}),
    "qwen2_vl": (tiny_qwen_shapes_model, "qwen2_vl", {}),
    "qwen2_5_vl": (functools.partial(tiny_qwen_shapes_model, kind="qwen2_5_vl"), "qwen2_5_vl", SHAPES_PIXELS),
    "qwen3_vl": (functools.partial(tiny_qwen_shapes_model, kind="qwen3_vl"), "qwen3_vl", SHAPES_PIXELS),
    # lmms-eval's own llava_onevision wrapper needs the LLaVA-NeXT `llava` package; llava_hf loads HF checkpoints
    "onevision": (tiny_onevision_shapes_model, "llava_hf", {}),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    for name, (build, _, _) in MODELS.items():
        model, proc = build()
        model.save_pretrained(root / name)
        proc.save_pretrained(root / name)
    export_task(root / "task", limit=6)
    return root


def expected_visual_tokens(base: str, folder, args: dict, image) -> tuple[int, int]:
    """(visual tokens in the wrapper's prompt for one Shapes image, those of them reducers never drop).
    llava_hf: the processor's placeholders; LLaVA-OneVision pins its crop grid's row-end image_newline
    tokens (a square Shapes image is one crop tile: one newline per patch row). The Qwen wrappers: the
    merged patch grid of the image that qwen_vl_utils resizes to multiples of 2 patches within the
    wrapper's min / max pixels (its defaults unless given)."""
    from lmms_eval.models import get_model
    from transformers import AutoConfig, AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    if base == "llava_hf":
        ids = proc(images=[image], text="USER: <image> what? ASSISTANT:", return_tensors="pt")["input_ids"]
        cfg = AutoConfig.from_pretrained(folder)
        if cfg.model_type != "llava_onevision":
            return int((ids == proc.image_token_id).sum()), 0
        side = cfg.vision_config.image_size
        assert image.size == (side, side)
        return int((ids == proc.image_token_id).sum()), side // cfg.vision_config.patch_size
    from qwen_vl_utils import smart_resize

    defaults = inspect.signature(get_model(base, force_simple=True).__init__).parameters
    pixels = {k: int(args.get(k, defaults[k].default)) for k in ("min_pixels", "max_pixels")}
    unit = proc.image_processor.patch_size * proc.image_processor.merge_size
    h, w = smart_resize(image.height, image.width, factor=unit, **pixels)
    return (h // unit) * (w // unit), 0


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("vtoken", force_simple=True).__name__ == "VTokenModel"


@pytest.mark.parametrize("folder", list(MODELS))
def test_lmms_eval_end_to_end_with_stats(saved, folder):
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoTokenizer

    _, base, extra = MODELS[folder]
    out, stats, n = saved / f"out_{folder}", saved / f"stats_{folder}.jsonl", 3
    model_args = ",".join([f"base={base}", f"pretrained={saved / folder}", "reducer=fastv", "keep=64",
                           f"stats_out={stats}", *(f"{k}={v}" for k, v in extra.items())])
    args = [sys.executable, "-m", "vtoken.eval.cli", "lmms", "--model_args", model_args,
            "--tasks", "vtoken_shapes", "--include_path", str(saved / "task"), "--limit", str(n),
            "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(find_results(out).read_text())
    assert "exact_match,none" in result["results"]["vtoken_shapes"]
    assert result["n-samples"]["vtoken_shapes"]["effective"] == n
    first = pq.read_table(saved / "task" / "data" / "test.parquet")["image"][0]["bytes"].as_py()
    visual, pinned = expected_visual_tokens(base, saved / folder, extra, Image.open(io.BytesIO(first)))
    assert visual > 64
    records = [json.loads(x) for x in stats.read_text().splitlines()]
    assert [r["doc_id"] for r in records] == list(range(n))
    for r in records:
        assert r["visual_tokens"] == [visual] and r["visual_tokens_last_layer"] == [64 + pinned], r
    assert all(r["flops"]["total"] > 0 for r in records)
    samples = [json.loads(x) for f in out.rglob("*samples_vtoken_shapes.jsonl") for x in f.read_text().splitlines()]
    assert len(samples) == n
    tok = AutoTokenizer.from_pretrained(saved / folder)
    for s in samples:  # trimmed with the original prompt length: only the (at most 4) new tokens remain, no
        # prompt text (a random model may generate the words "USER:" / "ASSISTANT:" themselves, so no test for them)
        text = s["filtered_resps"]
        text = text[0] if isinstance(text, list) else text
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 4, text


@pytest.mark.parametrize("base", ["llava_onevision", "llava"])
def test_llava_package_wrappers_are_refused_for_llava_hf(base):
    from vtoken.eval.lmms import VTokenModel

    with pytest.raises(ValueError, match="use base=llava_hf"):
        VTokenModel(base=base, pretrained="unused", reducer="fastv")


def test_failures_are_reported_not_hidden(saved):
    args = [sys.executable, "-m", "vtoken.eval.cli", "lmms",
            "--model_args", f"base=llava_hf,pretrained={saved / 'missing'},reducer=fastv",
            "--tasks", "vtoken_shapes", "--include_path", str(saved / "task"), "--limit", "2",
            "--output_path", str(saved / "out_fail")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "wrote no results" in proc.stderr
