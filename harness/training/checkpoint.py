"""Resume points, preemption, run identity (contracts C5, C7); the final weights: harness.training.artifacts.

A run's resume point is `last.ckpt` in its checkpoint directory. It is written every
`trainer.ckpt_every` optimizer steps and when SIGTERM stops training; a run started again with the
same WANDB_RUN_ID finds it and continues (`trainer.fit(ckpt_path=...)`), into the same W&B run.

A run id names one run: `last.ckpt` records the run config it was written for and is resumed only
by a run with an equal config; a run that completes leaves `finished.json` beside it, and its id is
then refused (`resume_point`). Every torch file read back goes through `load` (weights only).
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import zipfile
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from harness.config.run import RunConfig, flatten
from harness.errors import UserError
from harness.training import tracking

LAST = "last.ckpt"
FINISHED = "finished.json"  # written when a run completes: its id is not trained again
BLOCK_SCRATCH = "block.ckpt.tmp"  # a packed block's passing file (harness.members.checkpoints.BlockCheckpoint)
LEGACY_PACKED = "packed.pt"  # a packed member's resume point before issue 20 (now its last.ckpt): not read
PREEMPTED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
RESUME_ENV = "HARNESS_RESUME_FROM"  # rank 0's decision, inherited by the DDP ranks it launches


class UnreadableFile(UserError):
    """A torch file that is refused (it would run code when unpickled) or cannot be read: one line, exit 2."""


class ResumeRefused(UserError):
    """The run id names another run (other config) or a finished one: one line, exit 2, nothing written."""


def load(path: str, what: str) -> Any:
    """Read a torch file the harness did not write in this process: a model artifact, a resume
    point (a solo run's or a packed member's last.ckpt). Such a file may come from a W&B download or a shared directory,
    and unpickling runs whatever an object's __reduce__ names, so only torch's weights-only unpickler
    reads it (tensors, numbers, strings, containers: all the harness writes). The one home for this."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what the weights-only unpickler raises
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported global" in ln), None)
        if why:  # an object other than tensors and plain values: loading it would call its code
            raise UnreadableFile(
                f"{what} {path}: refused, it holds Python objects that loading would execute "
                f"({why[:200]}); the harness writes only tensors and plain values"
            ) from None
        raise UnreadableFile(f"{what} {path}: not a readable torch file ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UnreadableFile(f"{what} {path}: not a readable torch file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    # torch's weights-only message is a paragraph around the reason (e.g. "Unsupported operand 110")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file", "Check the doc"))]
    return (reason or lines or [type(e).__name__])[0][:200]


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The run config a resume point belongs to: every key of the logged config (tracking.run_config),
    flat; plumbing (where and how it ran: wandb.*, threads, progress bar, ckpt_dir, resume) may differ."""
    return {k: v for k, v in flatten(asdict(cfg)).items() if not tracking.is_plumbing(k)}


def _differences(saved: dict, now: dict) -> str:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
    shown = ", ".join(f"{k} ({saved.get(k, '<absent>')!r} there, {now.get(k, '<absent>')!r} here)" for k in keys[:6])
    return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def resume_point(cfg: RunConfig, run_id: str | None) -> tuple[dict[str, Any], str | None, int | None]:
    """The resume decision of a run about to start under `run_id` (a solo run, a packed member): (its
    identity, last.ckpt to resume, its step), or (its identity, None, None) for a fresh start. The
    identity, what its last.ckpt records, is the config as given, before the build resolves values in
    it (Omnigrok's data.split=auto): the next start's config, also unresolved, is compared with it.
    Decided before a W&B run exists, so that a refusal writes nothing: ResumeRefused when `run_id` names
    a finished run or a resume point of another config (a leftover WANDB_RUN_ID, a job re-submitted with
    new values). trainer.resume=never: a fresh start under this id; what the id left is removed."""
    ident = identity(cfg)
    if not run_id:
        return ident, None, None  # wandb makes a new id: nothing can be there
    directory = ckpt_dir(cfg, run_id)
    done, path = os.path.join(directory, FINISHED), os.path.join(directory, LAST)
    if cfg.trainer.resume == "never":
        for name in (FINISHED, LAST, LEGACY_PACKED, BLOCK_SCRATCH):
            if os.path.exists(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
        return ident, None, None
    if os.path.exists(done):
        info = _read_json(done)
        raise ResumeRefused(
            f"run {run_id} already finished (step {info.get('step', '?')}, {info.get('finished_at', '?')}; "
            f"{done}): a run id names one run, so it is not trained again; unset WANDB_RUN_ID (or give a new "
            "one) for a new run, or pass trainer.resume=never to train this id again from step 0"
        )
    if not os.path.isfile(path):
        if os.path.exists(os.path.join(directory, LEGACY_PACKED)):
            raise ResumeRefused(
                f"run {run_id}'s resume point {os.path.join(directory, LEGACY_PACKED)} is a packed block's "
                "from before issue 20, which this harness does not read; pass trainer.resume=never to train "
                "this id again from step 0"
            )
        return ident, None, None
    return ident, path, matched_step(run_id, path, f"resume point of run {run_id}", ident)


def matched_step(run_id: str | None, path: str, what: str, ident: dict) -> int:
    """The step of the Lightning checkpoint `path`, after checking it was written for this run config
    (ResumeRefused otherwise; `ident`: the config's identity taken before build() resolved values in
    it); read weights-only."""
    state = load(path, what)
    saved = (state.get("callbacks") or {}).get(StepCheckpoint.__name__, {}).get("config")  # its identity
    if not isinstance(saved, dict):
        raise ResumeRefused(
            f"resume point {path} records no run config (written by an older harness), so it "
            "cannot be matched to this run; pass trainer.resume=never to start this id from step 0"
        )
    if saved != ident:
        raise ResumeRefused(
            f"run {run_id}'s resume point {path} belongs to another run config: "
            f"{_differences(saved, ident)}; give this run a new WANDB_RUN_ID (or unset it), "
            "or pass trainer.resume=never to start this id again from step 0"
        )
    return int(state["global_step"])


def mark_finished(cfg: RunConfig, run_id: str, step: int) -> None:
    """`finished.json` in the run's checkpoint directory: the id is done (resume_point refuses it)."""
    directory = ckpt_dir(cfg, run_id)
    os.makedirs(directory, exist_ok=True)
    info = {
        "run_id": run_id,
        "step": step,
        "config": identity(cfg),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = os.path.join(directory, FINISHED)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, default=str)
    os.replace(path + ".tmp", path)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def merge_summaries(before: dict, now: dict) -> dict:
    """{metric: {aggregate: value}} of a run's two parts (before the resume point, after it) as
    one run's: min of the mins, max of the maxes, the first first, the last last. W&B computes
    each part's aggregates from that part's history only (a resumed run starts them afresh)."""
    out: dict[str, dict] = {}
    for key in set(before) | set(now):
        a, b = before.get(key) or {}, now.get(key) or {}
        merged = {**a, **b}
        for agg, pick in (("min", min), ("max", max)):
            if agg in a and agg in b:
                merged[agg] = pick(a[agg], b[agg])
        if "first" in a:
            merged["first"] = a["first"]
        out[key] = merged
    return out


def record(config: dict | None, before: dict, run) -> dict:
    """What a resume point records beside the training state (StepCheckpoint's state, also a packed
    member's): the run config it belongs to, and the summary aggregates of the run so far (the part
    before its own resume point, `before`, merged with the live run's)."""
    return {"config": config, "summary": merge_summaries(before, summaries(run))}


def finish_run(run, exit_code: int, before: dict | None = None, error: str | None = None) -> dict:
    """Finish a W&B run (a solo run's, a packed member's) and return its summary (tracking.summary_dict).
    Finished (0) or preempted (PREEMPTED_EXIT: W&B is told the run is being preempted, not that it
    failed), the whole run's aggregates go into the summary of its resumed part (`before`: those of the
    part before its resume point); failed (1), `error` goes into the summary."""
    if before and exit_code in (0, PREEMPTED_EXIT):
        run.summary.update(merge_summaries(before, summaries(run)))
    if error:
        run.summary["error"] = error
    if exit_code == PREEMPTED_EXIT:
        run.mark_preempting()
    summary = tracking.summary_dict(run)
    run.finish(exit_code=exit_code)
    return summary


def summaries(run) -> dict:
    """The aggregates (tracking.SUMMARIES) in a live run's summary, as plain dicts."""
    if run is None:
        return {}
    current, out = tracking.summary_dict(run), {}
    for key in tracking.SUMMARIES:
        value = current.get(key)
        if isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if isinstance(v, (int, float))}
    return out


class Preempted(Exception):
    """SIGTERM stopped run `run_id` after `step` optimizer steps; `path` holds the resume point."""

    exit_code = PREEMPTED_EXIT

    def __init__(self, step: int, path: str | None, run_id: str):
        self.step, self.path, self.run_id = step, path, run_id
        where = f"; resume point {path}; to resume, run it again with WANDB_RUN_ID={run_id}" if path else ""
        super().__init__(f"run {run_id} preempted (SIGTERM) at step {step}{where}")


def ckpt_dir(cfg: RunConfig, run_id: str) -> str:
    """`<trainer.ckpt_dir>/<run id>/`, by default `<wandb root>/checkpoints/<run id>/`: one directory
    per run, so that the runs of a sweep sharing one ckpt_dir never resume from each other."""
    return os.path.join(cfg.trainer.ckpt_dir or os.path.join(tracking.wandb_root(cfg), "checkpoints"), run_id)


class StepCheckpoint(Checkpoint):
    """Writes `<dir>/last.ckpt` after every `trainer.ckpt_every`-th optimizer step and when SIGTERM stops fit.

    Not Lightning's ModelCheckpoint: that one saves in on_train_batch_end, before the validation of
    the same step, and Lightning skips that validation when it resumes from such a checkpoint (and
    the event callbacks' state in it misses that evaluation). Here a step that is evaluated is saved
    after its evaluation (on_validation_end, where this callback runs last: Lightning orders
    Checkpoint callbacks after the others), any other step at its batch end. The SIGTERM save happens
    when Lightning raises SIGTERMException, at the end of a batch and its evaluation, on every rank
    at the same batch (Lightning broadcasts the signal). Writes go to a temporary file renamed into
    place, so a kill mid-write never leaves a broken resume point.

    It also carries what identifies and summarises the run (its state_dict): the run config, and
    the summary aggregates (best val/loss, ...) of the part of the run before the resume point,
    which `finish_run` merges into the resumed run's summary.
    """

    def __init__(self, directory: str, trainer, config: dict | None = None, run=None):
        self.directory, self.every, self.eval_every = directory, trainer.ckpt_every, trainer.eval_every
        self.path = os.path.join(directory, LAST)
        self.saved_step: int | None = None
        self.config, self.run = config, run
        self.before: dict = {}  # the aggregates of the run's earlier parts, from the resume point

    def state_dict(self) -> dict:
        return record(self.config, self.before, self.run)

    def load_state_dict(self, state: dict) -> None:
        self.before = state.get("summary") or {}

    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        return bool(self.every) and step % self.every == 0 and 0 < step < trainer.max_steps

    def save(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            os.makedirs(self.directory, exist_ok=True)
        tmp = self.path + ".tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # a resume point: written by rank 0, then a barrier
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._due(trainer) and trainer.global_step % self.eval_every != 0:
            self.save(trainer)

    def on_validation_end(self, trainer, pl_module):
        if (
            not trainer.sanity_checking
            and trainer.state.fn == "fit"
            and self._due(trainer)
            and self.saved_step != trainer.global_step
        ):
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        # The one epoch ends at trainer.steps. Lightning would still raise SIGTERMException after
        # this hook for a SIGTERM that came during the last batch or evaluation, skipping on_fit_end
        # (the event summaries) of a run that is complete: let it finish instead (exit 0).
        if trainer.global_step >= trainer.max_steps:
            trainer._signal_connector.received_sigterm = False

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.save(trainer)
