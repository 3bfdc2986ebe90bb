"""lmms-eval plugin end to end, offline, on a saved tiny Shapes model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from vtoken.eval.lmms import export_task, find_results
from vtoken.eval.models import tiny_qwen_shapes_model, tiny_shapes_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    for name, build in (("model", tiny_shapes_model), ("qmodel", tiny_qwen_shapes_model)):
        model, proc = build()
        model.save_pretrained(root / name)
        proc.save_pretrained(root / name)
    export_task(root / "task", limit=6)
    return root


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("vtoken", force_simple=True).__name__ == "VTokenModel"


@pytest.mark.parametrize("base,folder,visual", [("llava_hf", "model", 576), ("qwen2_vl", "qmodel", 144)])
def test_lmms_eval_end_to_end_with_stats(saved, base, folder, visual):
    out, stats = saved / f"out_{base}", saved / f"stats_{base}.jsonl"
    args = [sys.executable, "-m", "vtoken.eval.cli", "lmms",
            "--model_args", f"base={base},pretrained={saved / folder},reducer=fastv,keep=64,stats_out={stats}",
            "--tasks", "vtoken_shapes", "--include_path", str(saved / "task"), "--limit", "5",
            "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(find_results(out).read_text())
    assert "exact_match,none" in result["results"]["vtoken_shapes"]
    assert result["n-samples"]["vtoken_shapes"]["effective"] == 5
    records = [json.loads(x) for x in stats.read_text().splitlines()]
    assert [r["doc_id"] for r in records] == list(range(5))
    assert all(r["visual_tokens"] == [visual] and r["visual_tokens_last_layer"] == [64] for r in records)
    assert all(r["flops"]["total"] > 0 for r in records)
    samples = [json.loads(x) for f in out.rglob("*samples_vtoken_shapes.jsonl") for x in f.read_text().splitlines()]
    assert len(samples) == 5
    tok = (tiny_shapes_model if base == "llava_hf" else tiny_qwen_shapes_model)()[1].tokenizer
    for s in samples:  # trimmed with the original prompt length: only the (at most 4) new tokens remain
        text = s["filtered_resps"]
        text = text[0] if isinstance(text, list) else text
        assert "USER:" not in text and "ASSISTANT:" not in text
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 4


def test_failures_are_reported_not_hidden(saved):
    args = [sys.executable, "-m", "vtoken.eval.cli", "lmms",
            "--model_args", f"base=llava_hf,pretrained={saved / 'missing'},reducer=fastv",
            "--tasks", "vtoken_shapes", "--include_path", str(saved / "task"), "--limit", "2",
            "--output_path", str(saved / "out_fail")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "wrote no results" in proc.stderr
