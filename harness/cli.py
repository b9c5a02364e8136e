"""The `harness` command: train, sweep, agent, runs, sync, tasks."""

from __future__ import annotations

import argparse
import os
import sys

from harness.errors import UserError


def cmd_train(args) -> int:
    """Exit codes (contract C6): 0 finished, 2 bad input, 143 preempted (SIGTERM; resumable),
    1 anything else, a non-finite loss included."""
    from harness.config.results import RESULT_ENV, entry, write_results
    from harness.config.run import describe, load_config

    cfg = load_config(args.overrides)  # bad input is refused before torch and Lightning load
    if args.cfg:  # `harness train task=X [k=v ...] --cfg`: the resolved config, nothing run
        print(describe(cfg))
        return 0
    from harness.training.checkpoint import Preempted
    from harness.training.tracking import result_line
    from harness.training.train import NonFiniteLoss, train

    result_file = os.environ.get(RESULT_ENV)
    try:
        summary = train(cfg, args.overrides)
    except Preempted as e:
        print(f"harness: {e}", file=sys.stderr, flush=True)
        write_results(result_file, {e.run_id: entry("preempted")})
        return e.exit_code
    except NonFiniteLoss as e:
        print(f"harness: error: {e}", file=sys.stderr, flush=True)
        return 1
    if summary is None:  # a DDP rank other than 0: rank 0 prints the run's line
        return 0
    # The controller reads the result file (harness.config.results); the line is for people and scripts.
    write_results(
        result_file,
        {summary["_run_id"]: entry("finished", {k: v for k, v in summary.items() if not k.startswith("_")})},
    )
    print(result_line(summary), flush=True)
    return 0


def cmd_tasks(args) -> int:
    from harness.config.registry import config_module, tasks

    for name, ep in tasks().items():
        print(f"{name:18s} {config_module(name).TRAINING:28s} config: {ep.value}")
    print("\nkeys and defaults of one: harness train task=NAME --cfg", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    if args.dry_run:
        from harness.dry_run import dry_run

        if args.estimate_steps < 0:
            raise UserError(
                f"--estimate-steps {args.estimate_steps}: optimizer steps timed, an integer >= 1 "
                "(0: list the runs only)"
            )
        return dry_run(args.yaml, args.workers, args.pack, args.count, args.estimate_steps)
    from harness.sweep.local import create_local_sweep, run_agent
    from harness.sweep.spec import load_sweep_yaml
    from harness.sweep.wandb_sweep import create_wandb_sweep

    if args.local:
        if args.workers is not None and args.workers < 1:  # before the sweep exists
            raise UserError(f"--workers {args.workers}: the number of runs in parallel, an integer >= 1")
        if args.count is not None and args.count < 1:
            raise UserError(f"--count {args.count}: the number of runs to start, an integer >= 1")
        if args.pack is not None:
            from harness.sweep.packed_agent import check_pack

            check_pack(load_sweep_yaml(args.yaml), args.pack)
        sweep_id = create_local_sweep(
            args.yaml,
            args.wandb_dir,
            count=args.count,
            will_run=not args.no_run,
            project=args.project,
            entity=args.entity,
        )
        print(sweep_id, flush=True)
        if args.no_run:
            return 0
        code = run_agent(sweep_id, args.wandb_dir, workers=args.workers, count=args.count, pack=args.pack)
        print(sweep_id, flush=True)
        return code
    if args.pack is not None:
        raise UserError(
            f"--pack {args.pack} needs --local: packing is a local-controller feature (W&B's sweep "
            "server hands one run to each `wandb agent`)"
        )
    sweep_id = create_wandb_sweep(args.yaml, project=args.project, entity=args.entity)
    print(sweep_id, flush=True)
    return 0


def cmd_agent(args) -> int:
    from harness.sweep.local import run_agent
    from harness.sweep.wandb_sweep import run_wandb_agent

    if "/" in args.sweep_id:  # entity/project/id: a W&B sweep, run by W&B's own agent
        if args.pack is not None:
            raise UserError(
                f"--pack {args.pack}: packing is a local-controller feature; W&B's sweep server hands "
                "one run to each `wandb agent`"
            )
        return run_wandb_agent(args.sweep_id, args.count)
    return run_agent(args.sweep_id, args.wandb_dir, workers=args.workers, count=args.count, pack=args.pack)


def cmd_train_packed(args) -> int:
    """`harness train-packed BLOCK.json` (launched by the local controller with --pack; harness.members.packed)."""
    from harness.members.packed import run_spec

    return run_spec(args.block)


def cmd_runs(args) -> int:
    from harness import runstore

    if args.output and not args.output.endswith((".parquet", ".csv")):
        raise UserError(f"output {args.output!r}: use a .csv or .parquet file name")
    table = runstore.load_runs(args.source, sweep=args.sweep)
    if args.output:
        if args.output.endswith(".parquet"):
            runstore.to_parquet(table, args.output)
        else:
            runstore.exportable(table).to_csv(args.output, index=False)
        print(f"{len(table)} runs -> {args.output}", file=sys.stderr)
    else:
        cols = [c for c in ("id", "name", "state", "sweep") if c in table.columns]
        print(table[cols].to_string(index=False))
    # The exit code tells the truth: runs that could not be read are counted, and an export that
    # holds no run because every file failed is a failure, not an empty success.
    errors = table.attrs.get("errors", [])
    corrupt = int(table["corrupt"].sum()) if "corrupt" in table else 0
    if errors:
        print(
            f"harness runs: {len(errors)} run file(s) failed to load (listed above); {len(table)} run(s) loaded",
            file=sys.stderr,
        )
    if corrupt:
        print(
            f"harness runs: {corrupt} run(s) marked corrupt (damaged records dropped; column 'corrupt')",
            file=sys.stderr,
        )
    return 1 if errors and not len(table) else 0


def cmd_sync(args) -> int:
    """`harness sync SOURCE [--sweep ID]`: `wandb sync` of the chosen runs' directories (harness.runstore.upload)."""
    from harness.runstore import upload

    return upload.sync(upload.plan(args.source, args.sweep, args.project, args.entity), dry_run=args.dry_run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train one run: harness train task=sparse_parity model.width=64",
        epilog="tasks: `harness tasks`; every key of a task with its default, type and meaning: "
        "`harness train task=NAME --cfg`. --key=value (what wandb agent passes for "
        "${args}) is read as key=value.",
    )
    t.add_argument("overrides", nargs="*", help="key=value config overrides (task=NAME first)")
    t.add_argument("--cfg", action="store_true", help="print the resolved config (defaults, types, comments) and exit")
    t.set_defaults(fn=cmd_train)

    k = sub.add_parser("tasks", help="list the registered tasks")
    k.set_defaults(fn=cmd_tasks)

    s = sub.add_parser("sweep", help="validate a sweep YAML and create (and with --local, run) it")
    s.add_argument("yaml")
    s.add_argument("--local", action="store_true", help="run offline on this machine")
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs (with --pack: packed processes) in parallel on this machine; default 1, with --pack "
        "one per CPU core without a GPU, else 1",
    )
    s.add_argument("--count", type=int, default=None, help="stop after this many runs")
    s.add_argument("--no-run", action="store_true", help="with --local: create the sweep only")
    s.add_argument(
        "--pack",
        type=int,
        default=None,
        metavar="M",
        help="with --local: train up to M grid points of a task that packs in one process (docs/packing.md)",
    )
    s.add_argument("--wandb-dir", default=None, help="local wandb directory (default $WANDB_DIR/wandb, else ./wandb)")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print the runs it would start, the grid and an estimate of its wall time on this machine "
        "(unpacked and with --pack), timed on a few steps of the costliest point; creates no sweep",
    )
    s.add_argument(
        "--estimate-steps",
        type=int,
        default=50,
        metavar="K",
        help="with --dry-run: optimizer steps timed on the costliest point (default 50; 0: list the runs only)",
    )
    s.add_argument("--project", default=None, help="W&B project of the sweep and its runs (default: the YAML's)")
    s.add_argument("--entity", default=None, help="W&B entity (default: the YAML's, else yours)")
    s.set_defaults(fn=cmd_sweep)

    a = sub.add_parser("agent", help="join or resume a sweep (local id, or entity/project/id on W&B)")
    a.add_argument("sweep_id")
    a.add_argument("--workers", type=int, default=None, help="as for `harness sweep`")
    a.add_argument("--count", type=int, default=None)
    a.add_argument("--pack", type=int, default=None, metavar="M", help="train up to M grid points in one process")
    a.add_argument("--wandb-dir", default=None, help="(default $WANDB_DIR/wandb, else ./wandb)")
    a.set_defaults(fn=cmd_agent)

    tp = sub.add_parser("train-packed", help="train a block of grid points as one packed process (used by --pack)")
    tp.add_argument("block", help="block file written by the local controller")
    tp.set_defaults(fn=cmd_train_packed)

    r = sub.add_parser("runs", help="export the runs table: harness runs SOURCE -o runs.csv")
    r.add_argument("source", help="W&B path entity/project, or a local wandb directory")
    r.add_argument("--sweep", default=None)
    r.add_argument("-o", "--output", default=None, help=".csv or .parquet")
    r.set_defaults(fn=cmd_runs)

    y = sub.add_parser("sync", help="upload offline runs to W&B: harness sync wandb --sweep ID (wandb sync underneath)")
    y.add_argument("source", help="a local wandb directory")
    y.add_argument("--sweep", default=None, help="only this sweep's runs (a local sweep id)")
    y.add_argument("--project", default=None, help="override the project the runs recorded")
    y.add_argument("--entity", default=None, help="override the entity")
    y.add_argument("--dry-run", action="store_true", help="print the runs, their project and group, and the command")
    y.set_defaults(fn=cmd_sync)
    return p


def _hyphenated_overrides(argv: list[str]) -> list[str]:
    """`harness train --model.width=4` (wandb agent's ${args}) -> `model.width=4`, before argparse sees it."""
    if argv[:1] != ["train"]:
        return argv
    own = {"--cfg", "--help"}
    rest = [a[2:] if a.startswith("--") and "=" in a and a.split("=", 1)[0] not in own else a for a in argv[1:]]
    # argparse takes no positional after an option: `train task=X --cfg model.width=8` would be refused.
    flags = [a for a in rest if a in ("--cfg", "-h", "--help")]
    return argv[:1] + [a for a in rest if a not in flags] + flags


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(_hyphenated_overrides(list(sys.argv[1:] if argv is None else argv)))
    try:
        code = args.fn(args)
    except UserError as e:  # ConfigError too
        print(f"harness: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
