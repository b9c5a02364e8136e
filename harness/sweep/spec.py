"""A sweep YAML, checked before anything runs: W&B's sweep schema, the command, and every parameter
against the task's config schema (the same checks for a local sweep and for one handed to W&B)."""

from __future__ import annotations

import itertools
import os
import re

import yaml

from harness.config.run import check_overrides
from harness.errors import ConfigError, UserError

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
FLOAT_AS_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
MAX_CHECKED_COMBINATIONS = 2000
ARG_MACROS = ("${args}", "${args_no_hyphens}")  # `harness train` reads key=value and --key=value


def load_sweep_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"sweep file {path!r} does not exist")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a sweep file is a mapping with method, parameters and command")
    return cfg


def _values(spec: dict) -> list:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec[k] for k in ("min", "max") if k in spec]


def flat_parameters(params: dict, path: str = "sweep", prefix: str = "") -> dict:
    """W&B's nested form (`model: {parameters: {width: {...}}}`) as dotted keys (`model.width: {...}`).

    Validation and the local engine both work on dotted keys, so a typo under a nested block is
    caught like any other, and each grid point has one spelling.
    """
    out = {}
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise UserError(f"{path}: parameter {prefix}{key!r} must be a mapping like {{values: [...]}}, got {spec!r}")
        if "parameters" in spec:
            if not isinstance(spec["parameters"], dict) or set(spec) != {"parameters"}:
                raise UserError(f"{path}: nested parameter {prefix}{key} must hold only `parameters:` (a mapping)")
            out.update(flat_parameters(spec["parameters"], path, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = spec
    return out


def engine_config(cfg: dict) -> dict:
    """What the `sweeps` engine sees: dotted parameters; run_cap (a W&B server field) removed."""
    out = {k: v for k, v in cfg.items() if k != "run_cap"}
    out["parameters"] = flat_parameters(cfg.get("parameters") or {})
    return out


def varied_keys(cfg: dict) -> list[str]:
    """Dotted keys that take more than one value across the sweep (contract C8: runs are named by them)."""
    return [
        k
        for k, spec in flat_parameters(cfg.get("parameters") or {}).items()
        if k != "task" and not ("value" in spec or len(spec.get("values", [0, 0])) == 1)
    ]


def grid_size(cfg: dict) -> int | None:
    """Points in a grid sweep (None when a range is not a list of integers)."""
    n = 1
    for spec in flat_parameters(cfg.get("parameters") or {}).values():
        if "values" in spec:
            n *= len(spec["values"])
        elif "value" not in spec:
            lo, hi = spec.get("min"), spec.get("max")
            if not (isinstance(lo, int) and isinstance(hi, int)):
                return None
            n *= hi - lo + 1
    return n


def _check_command(cfg: dict, path: str) -> None:
    command = [str(c) for c in cfg.get("command", DEFAULT_COMMAND)]
    if "${program}" in command:
        raise UserError(
            f"{path}: command {command} runs `python ${{program}}`, but the harness is a module: "
            'write command: ["${env}", "${interpreter}", -m, harness, train, "${args_no_hyphens}"]'
        )
    macros = [c for c in command if c.startswith("${args")]
    if not macros:
        raise UserError(f"{path}: command {command} passes no parameters; add ${{args_no_hyphens}}")
    wrong = [c for c in macros if c not in ARG_MACROS]
    if wrong or len(macros) > 1:
        raise UserError(
            f"{path}: command passes parameters as {', '.join(wrong or macros)}; `harness train` reads "
            f"one of {' or '.join(ARG_MACROS)} (key=value or --key=value)"
        )


def validate_sweep(cfg: dict, path: str = "sweep") -> str:
    """W&B's sweep schema, the command, then every parameter against the task's config schema.

    Everything that would make every run fail, or the engine fail, is refused here, before a sweep
    directory or a run exists. Returns the task.
    """
    import jsonschema

    sweeps = sweeps_package()

    raw = cfg.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: no parameters section (a mapping of dotted config keys)")
    params = flat_parameters(raw, path)
    for key, spec in params.items():
        for v in _values(spec):
            if isinstance(v, str) and FLOAT_AS_STRING.match(v):
                raise UserError(
                    f"{path}: parameter {key} value {v!r} is a string in YAML; write it as "
                    f"{float(v):.1e} (a float needs a dot before the exponent)"
                )
    cap = cfg.get("run_cap")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise UserError(f"{path}: run_cap={cap!r}: the number of runs in the whole sweep, an integer >= 1")
    try:
        sweeps.SweepConfig({k: v for k, v in cfg.items() if k != "run_cap"})
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "top level"
        raise UserError(f"{path}: {e.message} (at {where}; see W&B's sweep configuration schema)") from None
    if cfg.get("method") == "bayes" and not (cfg.get("metric") or {}).get("name"):
        raise UserError(
            f"{path}: method bayes needs a metric to model, e.g. metric: {{name: val/loss, goal: minimize}}"
        )
    if cfg.get("early_terminate") and not (cfg.get("metric") or {}).get("name"):
        raise UserError(f"{path}: early_terminate needs a metric, e.g. metric: {{name: val/loss, goal: minimize}}")
    _check_command(cfg, path)
    task_spec = params.get("task")
    tasks = _values(task_spec) if isinstance(task_spec, dict) else []
    if len(tasks) != 1:
        raise UserError(f"{path}: parameters must fix the task, e.g. task: {{value: sparse_parity}}")
    task = tasks[0]
    choices = {k: _values(spec) for k, spec in params.items() if k != "task"}
    try:
        for key, values in choices.items():
            for v in values:
                check_overrides(task, {key: v}, cross_field=False)
        # Cross-field checks (k <= n, ...) on every combination, up to a bound.
        for combo in itertools.islice(itertools.product(*choices.values()), MAX_CHECKED_COMBINATIONS):
            check_overrides(task, dict(zip(choices, combo)))
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None
    try:  # the engine's own checks (e.g. a grid over a float range) now, not in a worker thread later
        sweeps.next_run(engine_config(cfg), [])
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: W&B's sweep engine refuses this sweep: {str(e).splitlines()[0]}") from None
    return task


def check_stops(cfg: dict, count: int | None) -> None:
    if cfg.get("method", "grid") != "grid" and count is None and cfg.get("run_cap") is None:
        raise UserError(f"method {cfg.get('method')!r} never runs out of parameters: give --count N or run_cap")


def sweeps_package():
    import warnings

    with warnings.catch_warnings():  # the sweeps engine still uses pydantic v1 config names
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps
