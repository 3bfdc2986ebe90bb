"""Sweeps (resume, Ray == local), plots and token visualisation."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import yaml
from PIL import Image

from vtoken.eval import cli, plots, sweep
from vtoken.eval.shapes import sample

SPEC = {
    "models": ["tiny-llava-shapes"],
    "tasks": ["shapes"],
    "limit": 4,
    "batch_size": 2,
    "reducers": ["none", {"name": "random", "params": {"keep": [32, 64]}}, {"name": "fastv", "params": {"keep": 64}}],
}


def test_grid_expansion_and_keys():
    configs = sweep.expand(SPEC)
    assert [(c.reducer, dict(c.params)) for c in configs] == [
        ("none", {}), ("random", {"keep": 32}), ("random", {"keep": 64}), ("fastv", {"keep": 64})]
    assert len({c.key for c in configs}) == 4
    with pytest.raises(ValueError, match="unknown sweep keys"):
        sweep.expand({**SPEC, "reducer": []})


def _partial_sweep(spec, out):  # runs in a child process that is killed midway
    sweep.run_sweep(spec, out, progress=False)


def test_sweep_resumes_after_a_kill_without_duplicates(tmp_path):
    out = tmp_path / "s.jsonl"
    spec = {**SPEC, "limit": 16, "batch_size": 4}
    child = mp.get_context("spawn").Process(target=_partial_sweep, args=(spec, str(out)))
    child.start()
    for _ in range(600):  # kill it once the first record has landed
        child.join(0.1)
        if out.exists() and out.read_text().count("\n") >= 1:
            break
    child.kill()
    child.join()
    first = [json.loads(x)["config_key"] for x in out.read_text().splitlines()]
    assert 1 <= len(first) < 4
    new = sweep.run_sweep(spec, str(out), progress=False)
    keys = [json.loads(x)["config_key"] for x in out.read_text().splitlines()]
    assert len(new) == 4 - len(first)
    assert len(keys) == len(set(keys)) == 4
    assert sweep.run_sweep(spec, str(out), progress=False) == []  # nothing left to do


def test_ray_executor_gives_the_same_records_as_local(tmp_path):
    pytest.importorskip("ray")
    local = sweep.run_sweep(SPEC, str(tmp_path / "local.jsonl"), "local", progress=False)
    remote = sweep.run_sweep({**SPEC, "num_cpus": 2}, str(tmp_path / "ray.jsonl"), "ray", progress=False)

    def essence(r):
        m = r["metrics"]
        return (r["config_key"], m["accuracy"], m["visual_tokens"], m["flops_per_sample"], m["per_category"])

    assert sorted(map(essence, local)) == sorted(map(essence, remote))


def test_cli_sweep_and_plot(tmp_path):
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump({**SPEC, "out": str(tmp_path / "r.jsonl")}))
    assert cli.main(["sweep", str(spec_file)]) == 0
    records = plots.load(tmp_path / "r.jsonl")
    assert len(records) == 4
    assert cli.main(["plot", str(tmp_path / "r.jsonl"), "-o", str(tmp_path / "p.png")]) == 0
    img = np.asarray(Image.open(tmp_path / "p.png").convert("L"))
    assert img.shape[1] > img.shape[0] > 300 and img.std() > 10  # a drawn figure, not a blank canvas
    ref = plots.with_reference(records)
    fastv = next(r for r in ref if r["config"]["reducer"] == "fastv")
    assert 0 < fastv["metrics"]["flops_pct"] < 100
    # the Markdown report beside the JSONL: one row per record, the unreduced one first at 100 % FLOPs
    report = (tmp_path / "r.md").read_text()
    main, per_category = report.split("Accuracy % per category:")
    rows = [line for line in main.splitlines() if line.startswith("| ") and not line.startswith("| reducer")]
    assert len(rows) == 4 and rows[0].startswith("| none | - |") and "| 100.0 |" in rows[0]
    fastv_row = next(line for line in rows if line.startswith("| fastv"))
    assert f"| {fastv['metrics']['flops_pct']:.1f} |" in fastv_row
    assert f"{100 * fastv['metrics']['accuracy']:.1f} (" in fastv_row  # accuracy with its interval
    cat_rows = [line for line in per_category.splitlines() if line.startswith("| ")]
    assert len(cat_rows) == 1 + 4 and "| color |" in cat_rows[0]  # the header, then one row per record


def test_pareto_front():
    assert plots.pareto([(10, 50), (20, 40), (30, 60), (25, 70)]) == [(10, 50), (25, 70)]


@pytest.mark.parametrize("reducer,keep", [("random", 64), ("hiprune", 100), ("fastv", 64)])
def test_viz_highlights_exactly_the_kept_patches(tmp_path, reducer, keep):
    image = tmp_path / "shape.png"
    Image.fromarray(sample("test", 3).image).save(image)
    out = tmp_path / "viz.png"
    assert cli.main(["viz", str(image), "--model", "tiny-llava-shapes", "--reducer", reducer, "--keep", str(keep),
                     "-o", str(out)]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    w = sheet.shape[1] // 2
    base, panel = sheet[18:, :w], sheet[18:, w:]
    # a patch is highlighted (kept) when its pixels are the input's, dimmed otherwise
    tiles = (base.reshape(24, 14, 24, 14, 3) == panel.reshape(24, 14, 24, 14, 3)).all(axis=(1, 3, 4))
    assert tiles.sum() == keep


def test_viz_shows_merged_groups(tmp_path):
    from vtoken.eval import models, viz

    model, proc, _ = models.load("tiny-llava-shapes")
    panels = viz.visualize(model, proc, Image.fromarray(sample("test", 5).image), [("tome", {"r": 100})])
    merged = panels[1]
    assert merged.groups is not None and len(set(merged.groups)) == len(merged.kept) == 576 - 200
