"""The trained Shapes models committed in assets/: they load offline and score what their vtoken.json documents;
`vtoken run`'s default is `assets/llava-shapes` only once a model there meets issue 16's bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtoken.eval import cli, models, runner
from vtoken.eval.train_cpu import meets_bar

TRAINED = sorted(p.parent for p in models.ASSETS.glob("**/vtoken.json") if (p.parent / "config.json").exists())
RUN4 = models.ASSETS / "llava-shapes-run4" / "model"


def _meta(folder: Path) -> dict:
    return json.loads((folder / "vtoken.json").read_text())


def test_assets_hold_the_run4_model():
    assert RUN4 in TRAINED


@pytest.mark.parametrize("folder", TRAINED, ids=[str(p.relative_to(models.ASSETS)) for p in TRAINED])
def test_trained_model_is_small_bf16_and_certified(folder):
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 40 * 2**20, f"{folder} is {size / 2**20:.1f} MB (issue 16: <= 40 MB)"
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    meta = _meta(folder)
    assert meta["test"]["split"] == "test" and meta["test"]["questions"] == 700
    assert {"seed0", "seed1"} <= set(meta["test"]) and meta["meets_bar"] == meets_bar(meta["test"])


def test_default_model_is_the_shipped_one_only_above_the_bar():
    shipped = models.ASSETS / "llava-shapes"
    if (shipped / "config.json").exists():
        assert models.default_model() == str(shipped) and meets_bar(_meta(shipped)["test"])
    else:
        assert models.default_model() == models.TINY


@pytest.mark.parametrize("folder", TRAINED, ids=[str(p.relative_to(models.ASSETS)) for p in TRAINED])
def test_trained_model_loads_offline_and_reaches_its_documented_accuracy(folder, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model, proc, info = models.load(str(folder))
    assert info["trained"] and next(model.parameters()).dtype == torch.float32
    check = _meta(folder)["check"]  # a small fixed subset of the test split, scored by `train_cpu --certify`
    record = runner.evaluate(model, proc, "none", {}, task="shapes", limit=check["limit"], batch_size=8,
                             seed=check["seed"], timing_batches=0, progress=False)
    assert record["config"]["limit"] == check["limit"]
    # one answer may flip between transformers / torch builds (fp32 sums in another order), no more
    assert record["metrics"]["accuracy"] >= check["accuracy"] - 1 / check["limit"] - 1e-9
    assert record["metrics"]["accuracy"] >= 0.7  # far above chance (~25 %): the weights are the trained ones


def test_demo_runs_each_reducer_at_the_models_equivalent_of_64_of_576(capsys):
    model, _, _ = models.load(str(RUN4))
    assert models.demo_keep(model) == (16, 144)
    assert models.demo_keep(models.load(models.TINY)[0]) == (64, 576)
    assert cli.main(["run", "--model", str(RUN4), "--limit", "8", "--batch-size", "8"]) == 0
    out = capsys.readouterr()
    assert "equivalent of 64 of 576" in out.err
    rows = [line for line in out.out.splitlines() if line.startswith("| ") and not line.startswith("| reducer")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["none", *cli.DEMO_REDUCERS]
    assert all("keep=16" in r for r in rows[1:])
