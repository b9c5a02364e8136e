"""Runs on W&B, through the official client (`wandb.Api`): one meta per run, as the offline store gives."""

from __future__ import annotations

from harness.config.run import flatten
from harness.runstore.local import SWEEP_TAG, SourceError, sweep_of


def api():
    """The official client (a function, so that tests can stand in for the server)."""
    import wandb

    return wandb.Api(timeout=60)


def load_wandb(source: str, sweep: str | None = None, filters: dict | None = None) -> list[dict]:
    f = dict(filters or {})  # passed to W&B unchanged: the server applies its own filter language
    try:
        runs = list(api().runs(source, filters={**f, "sweep": sweep} if sweep else f or None))
        if sweep and not runs:  # a local sweep, uploaded (`harness sync`): its runs carry tag sweep-<id>
            runs = list(api().runs(source, filters={**f, "tags": {"$in": [SWEEP_TAG + sweep]}}))
    except Exception as e:  # the client raises several types (CommError, ValueError, HTTPError)
        raise SourceError(
            f"{source!r} is neither a wandb directory nor a reachable W&B project: {e}".splitlines()[0]
        ) from None
    metas = []
    for r in runs:
        summary = getattr(r.summary, "_json_dict", None) or dict(r.summary)
        metas.append(
            {
                "id": r.id,
                "name": r.name,
                "state": r.state,
                "sweep": sweep_of(r.sweep.id if getattr(r, "sweep", None) else None, getattr(r, "tags", None)),
                "project": r.project,
                "group": getattr(r, "group", None),
                "job_type": getattr(r, "job_type", None),
                "tags": list(getattr(r, "tags", None) or []),
                "path": "/".join(r.path),
                "truncated": False,
                "corrupt": False,
                "config": flatten(dict(r.config)),
                "summary": {k: v for k, v in summary.items() if not k.startswith("_")},
                "artifacts": [],
                "_run": r,
            }
        )
    if sweep and not metas:
        raise SourceError(f"sweep {sweep!r} has no runs in {source}")
    return metas
