"""Quanta discovery from gradients (QDG, Michaud et al. 2023, section 5) as a run like any other.

A model (a Hugging Face causal LM, a model artifact of an earlier run, or a model this run trains
first), a set of samples it predicts well, their per-sample gradients, cosine similarity,
affinity 1 - arccos(C)/pi, spectral clustering for each `cluster.counts`; logged: artifact
`quanta-<run id>` (type `quanta`: samples.parquet, clusters.parquet, result.json, similarity.npy when
n <= sim.save_max) and in the summary the rank-frequency slope of the cluster sizes with its
interval, and for planted quanta (sparse parity) the adjusted Rand index and purity against the
true subtasks.

Language models are loaded, tokenized and read with the LM toolkit the Pythia evaluation uses too
(tasks.lm). A model trained by another task is rebuilt through the task registry by the name in its
config (C7), as the harness itself does: that task's `build()` gives the pure nn.Module
(`.module.model`) and the data that hold the labelled test set (`Job.data`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import quanta_stats as qs
from harness.config.registry import config_class, task_module
from harness.config.run import RunConfig, TrainerConfig
from harness.errors import ConfigError
from harness.training import tracking
from harness.training.data import DeviceDataModule
from harness.training.logs import write_summary
from harness.training.nn import n_params
from harness.training.train import Job
from tasks import lm
from tasks import qdg_core as core
from tasks.configs.quanta_discovery import Config, too_many_samples

ARTIFACT_TYPE = "quanta"


# -- models --------------------------------------------------------------------------------------


def _inner_config(train: dict, trainer: TrainerConfig) -> RunConfig:
    """Another task's config from a (nested) dict: train.* of this run, or the config in a model
    artifact. trainer: the trainer settings it runs with (this run's for a model trained here)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cls = config_class(train["task"])
    try:
        inner = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), train))
        inner.trainer = dataclasses.replace(trainer)
        inner.validate()
    except OmegaConfBaseException as e:
        raise ConfigError(f"train.*: {str(e).splitlines()[0]} (task {train['task']})") from None
    except ConfigError as e:
        raise ConfigError(f"train.*: {e}") from None
    return inner


def model_artifact(cfg: Config) -> dict:
    """{"state_dict", "config"} of run `model.artifact`, read from its `model.ckpt`
    (a Lightning checkpoint, harness.training.artifacts) or an older run's `model.pt`; a missing or
    foreign one is one line, before any gradient. Read weights-only (harness.training.checkpoint.load)."""
    from harness import runstore
    from harness.training.artifacts import MODEL_FILE, read_model

    m = cfg.model
    source = m.artifact_source or tracking.wandb_root(cfg)
    try:
        files = runstore.artifact_files(source, m.artifact, "model")
    except runstore.SourceError as e:
        raise ConfigError(f"model.artifact={m.artifact!r}: {e}") from None
    path = next((files[f] for f in (MODEL_FILE, "model.pt") if f in files and os.path.exists(files[f])), None)
    if path is None:
        raise ConfigError(
            f"model.artifact={m.artifact!r}: run has no model artifact with {MODEL_FILE} in {source} "
            f"(found: {', '.join(files) or 'none'}); train it with model.save=true"
        )
    try:
        return read_model(path)
    except Exception as e:  # noqa: BLE001 - an unpickling refusal, a damaged file: one line either way
        raise ConfigError(
            f"model.artifact={m.artifact!r}: {path} is not a model checkpoint "
            f"(state_dict + config): {str(e).splitlines()[0][:200]}"
        ) from None


def _trained_job(blob_config: dict) -> tuple[RunConfig, Job]:
    """Rebuild the task that trained a model: its config and Job (pure model + labelled data)."""
    config = dict(blob_config)
    if config.get("task") == "quanta_discovery":  # a model this task trained inline
        config = dict(config.get("train") or {})
    config.pop("wandb", None), config.pop("data_dir", None)  # where it was logged, not what it is
    # Rebuilt on the CPU in float32 whatever it trained on (this run's Lightning moves it to its device);
    # the artifact's weights are loaded into it.
    inner = _inner_config(config, TrainerConfig(accelerator="cpu"))
    return inner, task_module(inner.task).build(inner)


# -- samples -------------------------------------------------------------------------------------


def lm_samples(cfg: Config, model: nn.Module, tok, source_cfg: lm.LMSource) -> dict:
    """The paper's token selection over documents in order: forward passes only, no gradient."""
    source = lm.resolve_source(source_cfg)
    losses_fn = lm.TokenLosses(model, head_chunk=512)
    s, d = cfg.samples, cfg.data
    docs: dict[int, list[int]] = {}

    def stream():
        for i, text in lm.documents(source, d):
            ids = tok.encode([text], d.context_length)[0]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids], device=model.device)
            with torch.inference_mode():
                loss = losses_fn(x, torch.ones_like(x)).float().cpu().numpy()  # [L-1], targets 1..L-1
            docs[i] = ids
            yield i, ids, loss

    # samples.n=0: every token that passes, read only until one more than samples.max_n has passed
    chosen, passing = core.select_tokens(stream(), s.max_loss, s.drop_repeated_trigrams, s.stride, s.n or s.max_n + 1)
    if s.n and len(chosen) < s.n:
        raise ConfigError(
            f"samples.n={s.n} but only {len(chosen)} tokens pass the selection (loss < "
            f"samples.max_loss={s.max_loss}, drop_repeated_trigrams={s.drop_repeated_trigrams}, every "
            f"samples.stride={s.stride}-th of {passing}) in data.source={d.source!r}"
        )
    doc, pos = np.array([c[0] for c in chosen]), np.array([c[1] for c in chosen])
    k = s.context_tokens
    return {
        "doc": doc,
        "pos": pos,
        "token": np.array([docs[a][b] for a, b in zip(doc, pos)]),
        "loss": np.array([c[2] for c in chosen]),
        "context": [tok.decode(docs[a][max(0, b - k) : b]) for a, b in zip(doc, pos)],
        "target": [tok.decode([docs[a][b]]) for a, b in zip(doc, pos)],
        "docs": {a: torch.tensor(docs[a]) for a in np.unique(doc)},
        "passing": passing,
    }


def check_labelled(data, task: str) -> None:
    """QDG scores clusters against a task's planted labels: its data module must hold them."""
    if not all(hasattr(data, a) for a in ("test_tasks", "test_bits", "encode")):
        raise ConfigError(
            f"a {task} model has no labelled test set that QDG can read (test_tasks, test_bits, "
            "encode); model.source=train/artifact supports sparse_parity models"
        )


def parity_samples(cfg: Config, model: nn.Module, data, device) -> dict:
    """Test samples the model predicts well (loss < samples.max_loss), subtask ids kept, in a seeded order."""
    tasks, bits = data.test_tasks.to(device), data.test_bits.to(device)
    x, y = data.encode(tasks, bits, device)
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none")
    ok = torch.nonzero(loss < cfg.samples.max_loss).flatten().cpu().numpy()
    order = np.random.default_rng(cfg.seed).permutation(ok)
    n = cfg.samples.n or len(order)
    if n > len(order):
        raise ConfigError(
            f"samples.n={n} but only {len(order)} test samples have loss < samples.max_loss="
            f"{cfg.samples.max_loss} (the model has learned too little; train longer or lower samples.n)"
        )
    idx = np.sort(order[:n])
    return {
        "x": x[idx],
        "y": y[idx],
        "subtask": tasks[idx].cpu().numpy(),
        "loss": loss[idx].cpu().numpy(),
        "test_index": idx,
        "passing": len(order),
    }


# -- the run -------------------------------------------------------------------------------------


class QuantaDiscovery(L.Callback):
    """Runs QDG once: after fit (a model this run trained) or after the (empty) validation loop."""

    def __init__(self, cfg: Config, kind: str, stage: str, get_model, get_data=None, tok=None, source_cfg=None):
        self.cfg, self.kind, self.stage = cfg, kind, stage
        self.get_model, self.get_data, self.tok, self.source_cfg = get_model, get_data, tok, source_cfg

    def on_fit_end(self, trainer, pl_module):
        if self.stage == "fit":
            self.run(trainer, pl_module.device)

    def on_validation_end(self, trainer, pl_module):
        if self.stage == "validate" and not trainer.sanity_checking:
            with torch.inference_mode(False):  # Lightning validates under inference mode
                self.run(trainer, pl_module.device)

    def run(self, trainer, device) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        model = self.get_model().to(device).eval()
        params = core.select_params(model, cfg.grad.exclude, cfg.grad.include, cfg.grad.drop_embeddings)
        model.requires_grad_(False)  # only the selected parameters get gradients
        for p in params.values():
            p.requires_grad_(True)
        if self.kind == "lm":
            samples = lm_samples(cfg, model, self.tok, self.source_cfg)
            source = core.LMGrads(model, params, samples.pop("docs"), samples["doc"], samples["pos"], cfg.grad.batch)
        else:
            samples = parity_samples(cfg, model, self.get_data(), device)
            source = core.MLPGrads(model, params, samples.pop("x"), samples.pop("y"))
        n = source.n
        if n > cfg.samples.max_n:  # samples.n=0: every sample that passed, and more passed than the bound
            raise ConfigError(
                too_many_samples(f"samples.n={cfg.samples.n} chose every sample that passes", n, cfg.samples.max_n)
            )
        n_sub = len(np.unique(samples["subtask"])) if "subtask" in samples else 0
        counts = sorted(set(cfg.cluster.counts) | {m * n_sub for m in cfg.cluster.subtask_multiples if n_sub})
        bad = [k for k in counts if k >= n]
        if bad:
            raise ConfigError(
                f"cluster counts {bad} not below the {n} samples chosen (cluster.counts, "
                "cluster.subtask_multiples x subtasks); lower them or raise samples.n"
            )
        t1 = time.perf_counter()
        summary: dict[str, Any] = {
            "qdg/n_samples": n,
            "qdg/n_params": source.dim,
            "qdg/passing": samples["passing"],
            "qdg/seconds_select": t1 - t0,
        }
        g = cfg.sim
        stats: dict = {}
        if g.mode == "exact":
            C = core.exact_similarity(source, g.block, g.max_grad_mb << 20, stats=stats)
            summary["qdg/gradients_computed"] = stats["gradients_computed"]
        else:
            C = core.projected_similarity(source, g.dim, g.block, cfg.seed)
            err = core.projection_error(source, C, g.check_samples, g.block, cfg.seed, g.max_grad_mb << 20)
            summary.update({f"qdg/{k}": v for k, v in err.items()})
        t2 = time.perf_counter()
        summary["qdg/seconds_similarity"] = t2 - t1
        similarity = C.copy() if n <= g.save_max else None
        if not g.signed:
            np.abs(C, out=C)
        A = core.affinity_(C)
        labels = core.cluster(A, counts, cfg.cluster.n_init, cfg.seed)
        del A, C
        summary["qdg/seconds_cluster"] = time.perf_counter() - t2
        result = summarise(cfg, labels, samples.get("subtask"))
        summary.update(result["summary"])
        write_summary(trainer, summary)
        self._log(trainer, samples, labels, similarity, result)

    def _log(self, trainer, samples: dict, labels: dict, similarity, result: dict) -> None:
        import pandas as pd

        run = trainer.logger.experiment
        out = os.path.join(os.path.dirname(run.dir), ARTIFACT_TYPE)  # beside files/, as pythia_eval does
        os.makedirs(out, exist_ok=True)
        cols = {k: v for k, v in samples.items() if k != "passing"}
        pd.DataFrame({"sample": np.arange(len(cols["loss"])), **cols}).to_parquet(os.path.join(out, "samples.parquet"))
        pd.DataFrame(
            [(k, i, int(l)) for k, lab in labels.items() for i, l in enumerate(lab)],
            columns=["n_clusters", "sample", "label"],
        ).to_parquet(os.path.join(out, "clusters.parquet"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"kind": self.kind, "signed": self.cfg.sim.signed, **result}, f, default=float)
        if similarity is not None:
            np.save(os.path.join(out, "similarity.npy"), similarity)
        tracking.log_artifact(
            run, out, f"{ARTIFACT_TYPE}-{run.id}", ARTIFACT_TYPE, metadata={"kind": self.kind, "counts": sorted(labels)}
        )


def summarise(cfg: Config, labels: dict[int, np.ndarray], subtask) -> dict:
    """Rank-frequency per count, envelope and its fit; agreement with planted subtasks if known."""
    c = cfg.cluster
    per = {k: qs.sizes(v) for k, v in labels.items()}
    env = qs.envelope(list(per.values()))
    fit = qs.fit_slope(env, c.fit_rank_min, c.fit_rank_max)
    out = {"sizes": {str(k): v.tolist() for k, v in per.items()}, "envelope": env.tolist(), "fit": fit}
    summary = {
        "qdg/slope": fit["slope"],
        "qdg/slope_lo": fit["slope_lo"],
        "qdg/slope_hi": fit["slope_hi"],
        "qdg/fit_rank_min": fit["rank_min"],
        "qdg/fit_rank_max": fit["rank_max"],
    }
    if subtask is not None:
        agree = {str(k): qs.agreement(subtask, v) for k, v in labels.items()}
        n_sub = len(np.unique(subtask))
        # The headline count: the first multiple of the true subtask count, else the first count.
        first = next((m * n_sub for m in c.subtask_multiples), min(labels))
        out["agreement"] = agree
        summary |= {
            "qdg/n_subtasks": n_sub,
            "qdg/ari": agree[str(first)]["ari"],
            "qdg/purity": agree[str(first)]["purity"],
            "qdg/ari_clusters": first,
        }
    out["summary"] = summary
    return out


class _Holder(L.LightningModule):
    """The model under study, so that Lightning places it on the run's device; validation is empty."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def validation_step(self, batch, batch_idx):
        return None


class _OneBatch(DeviceDataModule):
    def val_batch(self, index, device):
        return None


def build(cfg: Config) -> Job:
    m, grad = cfg.model, cfg.grad
    if m.source == "train":
        inner = _inner_config(cfg.train, cfg.trainer)
        if "seed" not in cfg.train:  # the model trained here is the run `train.*` at this run's seed
            inner.seed = cfg.seed
        job = task_module(inner.task).build(inner)
        check_labelled(job.data or job.datamodule, inner.task)
        core.select_params(job.module.model, grad.exclude, grad.include, grad.drop_embeddings)
        cb = QuantaDiscovery(cfg, "parity", "fit", lambda: job.module.model, lambda: job.data or job.datamodule)
        return Job(
            module=job.module,
            datamodule=job.datamodule,
            callbacks=[*job.callbacks, cb],
            stage="fit",
            summary={**job.summary, "qdg/kind": "parity", "qdg/model_task": inner.task},
        )
    # hf or artifact: the model under study is held by _Holder and analysed after the (empty) validation
    if m.source == "hf":
        source_cfg = lm.LMSource(  # this run's model and documents, as the LM toolkit's loaders read them
            data_dir=cfg.data_dir,
            model=lm.ModelConfig(name=m.name, revision=m.revision, dtype=m.dtype, tokenizer=m.tokenizer),
            data=lm.DataConfig(**dataclasses.asdict(cfg.data)),  # its keys are a subset of the toolkit's
        )
        lm.resolve_source(source_cfg)  # a missing data source fails here, before the model loads
        model, tok = lm.load_model_and_tokenizer(source_cfg)
        summary = {**lm.param_counts(model), "qdg/kind": "lm"}
        kind, extra = "lm", {"tok": tok, "source_cfg": source_cfg}
    else:
        blob = model_artifact(cfg)
        inner, job = _trained_job(blob["config"])
        check_labelled(job.data or job.datamodule, inner.task)
        model = job.module.model
        model.load_state_dict(blob["state_dict"])
        summary = {
            "model/params": n_params(model),
            "qdg/kind": "parity",
            "qdg/model_task": inner.task,
        }
        kind, extra = "parity", {"get_data": lambda: job.data or job.datamodule}
    core.select_params(model, grad.exclude, grad.include, grad.drop_embeddings)  # fails early
    holder = _Holder(model)
    cb = QuantaDiscovery(cfg, kind, "validate", lambda: holder.model, **extra)
    return Job(module=holder, datamodule=_OneBatch(), callbacks=[cb], stage="validate", summary=summary)
