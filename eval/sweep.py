"""`vtoken sweep sweep.yaml`: a grid of models x tasks x reducers x parameters, one JSONL record each.

    models: [assets/llava-shapes]          # model directories, or tiny-llava-shapes
    tasks: [shapes]
    limit: 200
    batch_size: 8
    seed: 0
    reducers:
      - none                                # the unreduced reference (FLOPs %, retained %)
      - name: fastv
        params: {keep: [64, 128, 192]}      # lists expand into the grid
      - name: transprune
        params: {keep: 64, iga: [true, false]}
    executor: local                         # or: ray (address: auto / ray://host:10001, num_gpus: 1)
    out: runs/sweep.jsonl

Resumable: configs whose key is already in the output file are skipped, and each record is
appended (and flushed) as soon as its config finishes, so a killed sweep re-run does only the rest.
With `executor: ray`, every config is a Ray task (`num_gpus` each) on the cluster given by
`address`; results are gathered into the same JSONL by the driver.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Config:
    model: str
    task: str
    reducer: str
    params: tuple[tuple[str, Any], ...]
    limit: int
    batch_size: int
    seed: int
    device: str
    dtype: str

    @property
    def key(self) -> str:
        return json.dumps({"model": self.model, "task": self.task, "reducer": self.reducer,
                           "params": dict(self.params), "limit": self.limit, "seed": self.seed,
                           "dtype": self.dtype}, sort_keys=True)


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def expand(spec: dict[str, Any]) -> list[Config]:
    """The grid of configs described by a sweep spec (see module docstring)."""
    unknown = set(spec) - {"models", "tasks", "limit", "batch_size", "seed", "reducers", "executor", "out",
                           "device", "dtype", "address", "num_gpus", "num_cpus"}
    if unknown:
        raise ValueError(f"unknown sweep keys: {', '.join(sorted(unknown))}")
    if not spec.get("reducers"):
        raise ValueError("a sweep needs a non-empty `reducers` list")
    configs = []
    for model in _as_list(spec.get("models", ["tiny-llava-shapes"])):
        for task in _as_list(spec.get("tasks", ["shapes"])):
            for entry in spec["reducers"]:
                entry = {"name": entry} if isinstance(entry, str) else dict(entry)
                params = entry.get("params", {}) or {}
                names, values = list(params), [_as_list(v) for v in params.values()]
                for combo in itertools.product(*values):
                    configs.append(Config(
                        model=str(model), task=task, reducer=entry["name"],
                        params=tuple(zip(names, combo)), limit=int(spec.get("limit", 200)),
                        batch_size=int(spec.get("batch_size", 8)), seed=int(spec.get("seed", 0)),
                        device=str(spec.get("device", "cpu")), dtype=str(spec.get("dtype", "fp32")),
                    ))
    return configs


def done_keys(path: Path) -> set[str]:
    """Keys of the configs already recorded in `path` (a partial last line is ignored)."""
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        try:
            keys.add(json.loads(line)["config_key"])
        except (json.JSONDecodeError, KeyError):
            continue
    return keys


def run_config(cfg: Config) -> dict[str, Any]:
    """Evaluate one config in this process (loads its model, reusing the last one if it is the same)."""
    from vtoken.eval import runner

    model, proc, info = _load_cached(cfg.model, cfg.device, cfg.dtype)
    batches = runner.make_batches(proc, cfg.task, cfg.limit, cfg.batch_size, cfg.seed)
    record = runner.evaluate(model, proc, cfg.reducer, dict(cfg.params), task=cfg.task, limit=cfg.limit,
                             batch_size=cfg.batch_size, seed=cfg.seed, batches=batches, progress=False)
    record["config"]["model"] = info.get("model", cfg.model)
    record["config"]["model_trained"] = info.get("trained", True)
    record["config_key"] = cfg.key
    return record


_MODELS: dict[tuple[str, str, str], Any] = {}


def _load_cached(ref: str, device: str, dtype: str) -> Any:
    from vtoken.eval import models
    from vtoken.eval.cli import _dtype

    key = (ref, device, dtype)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time in memory
        _MODELS[key] = models.load(ref, device=device, dtype=_dtype(dtype))
    return _MODELS[key]


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def run_sweep(spec: dict[str, Any], out: str | None = None, executor: str | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every config of `spec` not yet in the output file; returns the new records."""
    path = Path(out or spec.get("out", "runs/sweep.jsonl"))
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = expand(spec)
    seen = done_keys(path)
    todo = [c for c in configs if c.key not in seen]
    executor = executor or spec.get("executor", "local")
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="sweep", disable=not progress)
    new: list[dict[str, Any]] = []
    if executor == "local":
        for cfg in todo:
            bar.set_postfix_str(f"{cfg.reducer} {dict(cfg.params)}")
            record = run_config(cfg)
            _append(path, record)
            new.append(record)
            bar.update()
    elif executor == "ray":
        new = _run_ray(todo, spec, path, bar)
    else:
        raise ValueError(f"unknown executor {executor!r}; use local or ray")
    bar.close()
    return new


def write_report(out: str | Path) -> Path:
    """Markdown tables of every record in the sweep's JSONL, beside it (`.md`): per model and task,
    accuracy with its 95% interval, % retained and FLOPs % of the unreduced row, then accuracy per category."""
    from vtoken.eval import plots, runner

    path = Path(out)
    records = plots.with_reference(plots.load(path))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["config"].get("model", "?"), r["config"]["task"]), []).append(r)
    parts = []
    for (model, task), rs in groups.items():
        rs.sort(key=lambda r: r["config"]["reducer"] != "none")  # the reference row first
        limit, seed = rs[0]["config"]["limit"], rs[0]["config"]["seed"]
        parts += [f"## {model} on {task} ({limit} questions, seed {seed})", "", runner.table(rs), "",
                  "Accuracy % per category:", "", runner.category_table(rs), ""]
    report = path.with_suffix(".md")
    report.write_text("\n".join(parts))
    return report


def _run_ray(todo: list[Config], spec: dict[str, Any], path: Path, bar: Any) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("the ray executor needs Ray: pip install 'vtoken[ray]'") from e
    started = not ray.is_initialized()
    if started:
        address = spec.get("address")
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": spec.get("num_cpus", 2)}))
    task = ray.remote(num_gpus=float(spec.get("num_gpus", 0)))(run_config)
    pending = [task.remote(cfg) for cfg in todo]
    new = []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            record = ray.get(ready[0])
            _append(path, record)
            new.append(record)
            bar.update()
    finally:
        if started:
            ray.shutdown()
    return new


def load_spec(path: str | Path) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep file is a YAML mapping")
    return spec
