"""The `harness` command: train, sweep, agent, runs."""
from __future__ import annotations

import argparse
import json
import sys

from harness.errors import ConfigError, UserError


def cmd_train(args) -> int:
    from harness.config import load_config
    from harness.train import train

    cfg = load_config(args.overrides)
    summary = train(cfg, args.overrides)
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)
    return 0


def cmd_sweep(args) -> int:
    from harness import controller

    if args.local:
        sweep_id = controller.create_local_sweep(args.yaml, args.wandb_dir)
        print(sweep_id, flush=True)
        if args.no_run:
            return 0
        controller.run_agent(sweep_id, args.wandb_dir, workers=args.workers, count=args.count)
        print(sweep_id, flush=True)
        return 0
    sweep_id = controller.create_wandb_sweep(args.yaml, project=args.project, entity=args.entity)
    print(sweep_id, flush=True)
    return 0


def cmd_agent(args) -> int:
    from harness import controller

    if "/" in args.sweep_id:  # entity/project/id: a W&B sweep, run by W&B's own agent
        return controller.run_wandb_agent(args.sweep_id, args.count)
    controller.run_agent(args.sweep_id, args.wandb_dir, workers=args.workers, count=args.count)
    return 0


def cmd_runs(args) -> int:
    from harness import runstore

    if args.output and not args.output.endswith((".parquet", ".csv")):
        raise UserError(f"output {args.output!r}: use a .csv or .parquet file name")
    table = runstore.load_runs(args.source, sweep=args.sweep)
    if args.output:
        if args.output.endswith(".parquet"):
            runstore.to_parquet(table, args.output)
        else:
            table.to_csv(args.output, index=False)
        print(f"{len(table)} runs -> {args.output}", file=sys.stderr)
    else:
        cols = [c for c in ("id", "name", "state", "sweep") if c in table.columns]
        print(table[cols].to_string(index=False))
    # The exit code tells the truth: runs that could not be read are counted, and an export that
    # holds no run because every file failed is a failure, not an empty success.
    errors = table.attrs.get("errors", [])
    corrupt = int(table["corrupt"].sum()) if "corrupt" in table else 0
    if errors:
        print(f"harness runs: {len(errors)} run file(s) failed to load (listed above); "
              f"{len(table)} run(s) loaded", file=sys.stderr)
    if corrupt:
        print(f"harness runs: {corrupt} run(s) marked corrupt (damaged records dropped; column 'corrupt')",
              file=sys.stderr)
    return 1 if errors and not len(table) else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run: harness train task=sparse_parity model.width=64")
    t.add_argument("overrides", nargs="*", help="key=value config overrides (task=NAME first)")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sweep", help="validate a sweep YAML and create (and with --local, run) it")
    s.add_argument("yaml")
    s.add_argument("--local", action="store_true", help="run offline on this machine")
    s.add_argument("--workers", type=int, default=1, help="runs in parallel on this machine")
    s.add_argument("--count", type=int, default=None, help="stop after this many runs")
    s.add_argument("--no-run", action="store_true", help="with --local: create the sweep only")
    s.add_argument("--wandb-dir", default="wandb", help="local wandb directory (default ./wandb)")
    s.add_argument("--project", default=None)
    s.add_argument("--entity", default=None)
    s.set_defaults(fn=cmd_sweep)

    a = sub.add_parser("agent", help="join or resume a sweep (local id, or entity/project/id on W&B)")
    a.add_argument("sweep_id")
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--count", type=int, default=None)
    a.add_argument("--wandb-dir", default="wandb")
    a.set_defaults(fn=cmd_agent)

    r = sub.add_parser("runs", help="export the runs table: harness runs SOURCE -o runs.csv")
    r.add_argument("source", help="W&B path entity/project, or a local wandb directory")
    r.add_argument("--sweep", default=None)
    r.add_argument("-o", "--output", default=None, help=".csv or .parquet")
    r.set_defaults(fn=cmd_runs)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = args.fn(args)
    except (ConfigError, UserError) as e:
        print(f"harness: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
