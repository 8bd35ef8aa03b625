"""Sweeps for the paper's tables: cells (one trained model each, sampled under several settings),
run resumably, reported as one table and one Pareto picture (gen. PPL vs entropy, Fig. 4 left).

The ladder of ``hdlm repro`` (:data:`LADDER`) and a grid read from YAML (:func:`grid_cells`) are
both lists of :class:`Cell` and go through the same :func:`run_cells` and :func:`sweep_table`.
A grid file::

    base: tiny-ptb                  # preset or YAML file (default: the --scale preset of hdlm repro)
    overrides: [train.steps=200]    # applied to every cell
    grid:
      gamma: [0.0, 0.01]            # γ-hybrid cells (process.kind=gamma); γ = 0 is SEDD-absorb
      epsilon: [0.01]               # ε-hybrid cells (process.kind=epsilon, no time conditioning)
      width: [4, 8]                 # ω (schedule.width; block / slide cells only)
      schedule: [block]             # hyperschedule kind (schedule.kind)
      configuration: [aligned, shifted]
      train.lr: [1e-3]              # any other config field, by its dotted name
      rho: [1, 2]                   # sampling: generation rate ρ (no retraining)
      eta: [0.0, 0.01]              # sampling, ε cells: Algorithm 3 (η = 0) or ACS (η > 0)

Training axes multiply into cells (γ and ε values together form the process axis); ρ and η
multiply into each cell's sampling settings. Resumable: a cell whose ``OUT/NAME/cell.json`` exists
(written atomically once the cell is done) is skipped — after checking that it was run with the
same config and settings — and a cell whose training was cut short continues from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import WINDOWED_KINDS, load_config
from .errors import HDLMError
from .experiment import ExperimentPlan, SampleSetting

CELL_FILE = "cell.json"
EPSILON_MODEL = ["model.time_conditioning=false"]  # ε cells follow MDLM (no time conditioning), as the ladder

# name -> (overrides over the base, sampler settings: list of (sampler, eta))
LADDER: dict[str, tuple[list[str], list[tuple[str, float | None]]]] = {
    "sedd-absorb-flat": (["process.kind=absorb", "schedule.kind=flat"], [("analytic", None)]),
    "gamma0.01-flat": (["process.kind=gamma", "process.gamma=0.01", "schedule.kind=flat"], [("analytic", None)]),
    "gamma0.05-flat": (["process.kind=gamma", "process.gamma=0.05", "schedule.kind=flat"], [("analytic", None)]),
    "gamma0.01-block": (["process.kind=gamma", "process.gamma=0.01", "schedule.kind=block"], [("analytic", None)]),
    "gamma0.01-slide": (["process.kind=gamma", "process.gamma=0.01", "schedule.kind=slide"], [("analytic", None)]),
    "gamma0.01-block-shifted": (["process.kind=gamma", "process.gamma=0.01", "schedule.kind=block",
                                 "model.configuration=shifted"], [("analytic", None)]),
    "mdlm-flat": (["process.kind=mdlm", "schedule.kind=flat", *EPSILON_MODEL], [("ancestral", None)]),
    "epsilon0.01-flat": (["process.kind=epsilon", "process.epsilon=0.01", "schedule.kind=flat", *EPSILON_MODEL],
                         [("ancestral", None), ("acs", 0.01)]),
    "epsilon0.01-block": (["process.kind=epsilon", "process.epsilon=0.01", "schedule.kind=block", *EPSILON_MODEL],
                          [("ancestral", None), ("acs", 0.01)]),
    "ar": (["schedule.kind=quench", "model.configuration=shifted"], [("ar", None)]),
}
GRID_KEYS = ("gamma", "epsilon", "width", "schedule", "configuration", "rho", "eta")


@dataclass
class Cell:
    """One trained model (``overrides`` over the base config) and the settings it is sampled with."""

    name: str
    overrides: list[str]
    settings: list[SampleSetting]
    labels: dict = field(default_factory=dict)  # axis -> value, for the table


# --------------------------------------------------------------------------------------------
# cells: the ladder, or a grid


def ladder_cells(names: list[str], rhos: list[float]) -> list[Cell]:
    """The ladder entries ``names`` (see :data:`LADDER`), each sampled at every ρ (AR: ρ = 1 only)."""
    unknown = [n for n in names if n not in LADDER]
    if unknown:
        raise HDLMError(f"--only: unknown entry '{unknown[0]}' (entries: {', '.join(LADDER)})")
    cells = []
    for name in names:
        overrides, samplers = LADDER[name]
        ar = "schedule.kind=quench" in overrides
        settings = [SampleSetting(sampler=s, rho=r, eta=eta) for s, eta in samplers for r in ([1.0] if ar else rhos)]
        cells.append(Cell(name, list(overrides), settings, {"entry": name}))
    return cells


def _values(grid: dict, key: str, kind: Callable[[Any], Any]) -> list:
    raw = grid.get(key)
    if raw is None:
        return []
    raw = raw if isinstance(raw, list) else [raw]
    try:
        out = [kind(v) for v in raw]
    except (TypeError, ValueError):
        raise HDLMError(f"grid {key}: {raw!r} must be a list of {getattr(kind, '__name__', 'values')} values") from None
    if not out:
        raise HDLMError(f"grid {key}: empty list (leave the key out instead)")
    return out


def _process_axis(grid: dict) -> list[tuple[dict, list[str]]]:
    """[(labels, overrides)] of the γ and ε values (one cell each), or one empty entry."""
    axis = [({"process": f"γ={g:g}"}, ["process.kind=gamma", f"process.gamma={g!r}"])
            for g in _values(grid, "gamma", float)]
    axis += [({"process": f"ε={e:g}"}, ["process.kind=epsilon", f"process.epsilon={e!r}", *EPSILON_MODEL])
             for e in _values(grid, "epsilon", float)]
    return axis or [({}, [])]


def _training_axes(grid: dict) -> list[list[tuple[dict, list[str]]]]:
    axes = [_process_axis(grid)]
    for key, field_name, kind in (("schedule", "schedule.kind", str), ("width", "schedule.width", int),
                                  ("configuration", "model.configuration", str)):
        if key in grid:
            axes.append([({key: v}, [f"{field_name}={v}"]) for v in _values(grid, key, kind)])
    for key in sorted(k for k in grid if "." in k):  # any config field by its dotted name
        axes.append([({key: v}, [f"{key}={v}"]) for v in _values(grid, key, lambda v: v)])
    return axes


def _cell_name(labels: dict) -> str:
    """A folder name from the axis values: gamma0.01-block-w8-shifted-train.lr=0.001."""
    def part(key: str, value: Any) -> str:
        if key == "process":
            return str(value).replace("γ=", "gamma").replace("ε=", "epsilon")
        return f"w{value}" if key == "width" else (f"{key}={value}" if "." in key else str(value))

    name = "-".join(part(k, v) for k, v in labels.items()).replace("/", "_").replace(" ", "")
    return name or "base"


def grid_cells(grid: dict, base_kind: str = "block") -> list[Cell]:
    """The cells of a ``grid:`` mapping (see the module docstring); ``base_kind`` is the base config's
    schedule kind (ω does not apply to flat / quench cells: they are not multiplied by the width axis)."""
    if not isinstance(grid, dict) or not grid:
        raise HDLMError("grid: expected a mapping of axes, e.g. {gamma: [0.01], rho: [1, 2]}")
    unknown = [k for k in grid if k not in GRID_KEYS and "." not in k]
    if unknown:
        raise HDLMError(f"grid: unknown axis '{unknown[0]}' (axes: {', '.join(GRID_KEYS)}, or a dotted config field)")
    rhos = _values(grid, "rho", float) or [1.0]
    etas = _values(grid, "eta", float)
    if any(r <= 0 for r in rhos) or any(not 0 <= e <= 1 for e in etas):
        raise HDLMError(f"grid: rho must be > 0 and eta in [0, 1] (got rho {rhos}, eta {etas})")
    cells: dict[str, Cell] = {}
    for combo in itertools.product(*_training_axes(grid)):
        labels = {k: v for lab, _ in combo for k, v in lab.items()}
        overrides = [o for _, ov in combo for o in ov]
        kind = labels.get("schedule", base_kind)
        if kind not in WINDOWED_KINDS and "width" in labels:  # ω does not apply: one cell, not one per ω
            labels.pop("width")
            overrides = [o for o in overrides if not o.startswith("schedule.width=")]
        epsilon = labels.get("process", "").startswith("ε")
        samplers = [("ancestral" if e == 0 else "acs", e) for e in etas] if epsilon and etas else [("auto", None)]
        settings = [SampleSetting(sampler=s, rho=1.0 if kind == "quench" else r, eta=eta)
                    for s, eta in samplers for r in (rhos if kind != "quench" else [1.0])]
        name = _cell_name(labels)
        cells.setdefault(name, Cell(name, overrides, settings, labels))
    return list(cells.values())


def read_grid(path: str | Path) -> dict:
    """A grid YAML file as ``{"base": str | None, "overrides": [...], "grid": {...}}``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HDLMError(f"--grid {path}: file not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HDLMError(f"--grid {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict) or "grid" not in spec:
        raise HDLMError(f"--grid {path}: expected a mapping with a 'grid:' section")
    extra = set(spec) - {"base", "overrides", "grid"}
    if extra:
        raise HDLMError(f"--grid {path}: unknown key '{sorted(extra)[0]}' (keys: base, overrides, grid)")
    overrides = spec.get("overrides") or []
    if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
        raise HDLMError(f"--grid {path}: overrides must be a list of SECTION.FIELD=VALUE strings")
    return {"base": spec.get("base"), "overrides": overrides, "grid": spec["grid"]}


# --------------------------------------------------------------------------------------------
# running, resumably


def cell_config(cell: Cell, base: str, base_overrides: list[str], overrides: list[str]):
    """The config of a cell: the base, then the base's overrides, the cell's, and the user's (last wins)."""
    return load_config(base, list(base_overrides) + list(cell.overrides) + list(overrides))


def _spec(cfg, cell: Cell, plan: ExperimentPlan) -> dict:
    """What a finished cell was run with (compared when it is skipped)."""
    config = cfg.to_dict()
    config["train"].pop("out_dir", None)
    keys = ("num_samples", "sample_seed", "estimators", "mc_samples", "eval_data", "eval_sequences")
    return {"config": config, "settings": [dataclasses.asdict(s) for s in cell.settings],
            "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(plan).items()
                     if k in keys}}


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def run_cells(cells: list[Cell], out: str | Path, base: str, base_overrides: list[str], overrides: list[str],
              plan: ExperimentPlan, *, judge=None, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Train, sample and evaluate every cell into ``out/NAME`` (:func:`hdlm.experiment.run_experiment`),
    skipping finished cells; returns {name: result} and keeps ``out/results.json`` up to date."""
    from .experiment import run_experiment

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for k, cell in enumerate(cells, 1):
        cfg = cell_config(cell, base, base_overrides, overrides)
        cell_plan = dataclasses.replace(plan, settings=tuple(cell.settings))
        spec, done = _spec(cfg, cell, cell_plan), out / cell.name / CELL_FILE
        if done.exists():
            record = json.loads(done.read_text())
            if record.get("spec") != spec:
                raise HDLMError(f"{out / cell.name} holds a cell run with another config or settings: "
                                f"choose another --out, or remove that folder")
            log(f"hdlm repro: [{k}/{len(cells)}] {cell.name}: done before, skipped")
            results[cell.name] = record["result"]
            continue
        log(f"hdlm repro: [{k}/{len(cells)}] {cell.name}: {' '.join(cell.overrides) or '(base)'}")
        result = run_experiment(cfg, out / cell.name, cell_plan, judge=judge, resume=True)
        result["labels"] = cell.labels
        _atomic_json(done, {"spec": spec, "result": result})
        results[cell.name] = result
        _atomic_json(out / "results.json", results)
    _atomic_json(out / "results.json", results)
    return results


# --------------------------------------------------------------------------------------------
# one table, one Pareto picture


def _bound(b: dict | None) -> str:
    if not b:
        return "—"
    return f"{b['ppl']:.1f} (exact)" if b["estimator"] == "exact" else f"{b['ppl']:.1f} ± {b['ppl'] * b['stderr']:.1f}"


def sweep_rows(results: dict[str, dict]) -> list[dict]:
    """One row per (cell, sampling setting): the cell's model and bounds, the setting's sample quality."""
    rows = []
    for name, r in results.items():
        cfg, bounds = r["config"], r.get("bounds", {})
        p, sc, m = cfg["process"], cfg["schedule"], cfg["model"]
        process = {"gamma": f"γ = {p['gamma']:g}", "epsilon": f"ε = {p['epsilon']:g}"}.get(p["kind"], p["kind"])
        schedule = sc["kind"] + (f" ω = {sc['width']}" if sc["kind"] in WINDOWED_KINDS and sc.get("width") else "")
        exact = bounds.get("exact")
        for e in r["samples"]:
            rows.append({"cell": name, "process": process, "schedule": schedule, "configuration": m["configuration"],
                         "sampler": e["sampler"], "rho": e["rho"], "eta": e.get("eta"),
                         "discrete": _bound(exact or bounds.get("discrete")),
                         "continuous": _bound(exact or bounds.get("continuous")),
                         "gen_ppl": (e.get("gen_ppl") or {}).get("ppl_token_weighted"), "entropy": e["entropy"],
                         "tokens_per_s": e["tokens_per_s"]})
    return rows


def pareto_front(rows: list[dict]) -> list[bool]:
    """Which rows are on the Pareto front of (low gen. PPL, high entropy): no other row is at least as
    good in both and better in one. Rows without a gen. PPL are never on it."""
    pts = [(r["gen_ppl"], r["entropy"]) for r in rows]

    def dominated(a, b) -> bool:  # b dominates a
        return b[0] <= a[0] and b[1] >= a[1] and (b[0] < a[0] or b[1] > a[1])

    return [p[0] is not None and not any(q[0] is not None and dominated(p, q) for q in pts) for p in pts]


def sweep_table(rows: list[dict]) -> str:
    """The markdown table of :func:`sweep_rows` (★: on the Pareto front of gen. PPL vs entropy)."""
    lines = ["| cell | process | schedule | configuration | sampler | ρ | η | discrete bound | continuous estimate (Alg. 1) "
             "| gen. PPL | entropy | tokens/s |", "|---|---|---|---|---|---:|---:|---|---|---:|---:|---:|"]
    for r, front in zip(rows, pareto_front(rows)):
        gp = "n/a" if r["gen_ppl"] is None else f"{r['gen_ppl']:.1f}" + (" ★" if front else "")
        eta = "—" if r["eta"] is None else f"{r['eta']:g}"
        lines.append(f"| {r['cell']} | {r['process']} | {r['schedule']} | {r['configuration']} | {r['sampler']} | "
                     f"{r['rho']:g} | {eta} | {r['discrete']} | {r['continuous']} | {gp} | {r['entropy']:.2f} | "
                     f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


__all__ = ["CELL_FILE", "Cell", "LADDER", "cell_config", "grid_cells", "ladder_cells", "pareto_front", "read_grid", "run_cells",
           "sweep_rows", "sweep_table"]
