"""Config of the quanta discovery task (tasks/quanta_discovery.py).

Imports neither torch nor Lightning: `harness train task=quanta_discovery --cfg`, `harness tasks` and sweep
validation read this module only; the training code (tasks.quanta_discovery) is imported when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.config.run import RunConfig, TrainerConfig
from harness.errors import ConfigError

# The module with build(cfg) -> Job, imported by the registry only when a run starts.
TRAINING = "tasks.quanta_discovery"

SOURCES = ("hf", "artifact", "train")
MODES = ("exact", "projected")
# Parameter-name substrings left out of the gradients by default (tasks.qdg_core.select_params).
DEFAULT_EXCLUDE = ("layernorm", "embed")


@dataclass
class ModelConfig:
    # hf: a causal LM, loaded by tasks.lm (as pythia_eval loads it); artifact: the `model` artifact (C7) of run
    # `artifact`; train: this run first trains the config in `train.*` (e.g. sparse parity).
    source: str = "hf"
    name: str = "EleutherAI/pythia-70m"  # hf: hub name or local directory (relative: cwd, then data_dir)
    revision: str = "step143000"
    dtype: str = "float32"
    tokenizer: str = ""  # "" = the model's own; else a tokenizer.json (relative: under data_dir)
    artifact: str = ""  # artifact: the run id whose model artifact to load
    artifact_source: str = ""  # wandb directory or entity/project holding that run ("" = $WANDB_DIR/wandb)
    save: bool = True  # train: log the trained weights as model-<run id> (C7)


@dataclass
class DataConfig:  # language models: documents, read by tasks.lm (as pythia_eval reads them)
    source: str = "pile/test.jsonl.zst"
    text_key: str = "text"
    split: str = "test"
    first_doc: int = 0
    n_docs: int = 0  # 0 = read until samples.n tokens are chosen
    context_length: int = 1024  # documents truncated to this many tokens (the paper's max_length)


@dataclass
class SamplesConfig:
    n: int = 10000  # samples to cluster (0 = every one that passes, up to max_n)
    # Refuse more samples than this (raise it to ask for more): the n x n similarity and spectral
    # clustering's copies of it take ~20 n^2 bytes (1.9 GB at 10,000; 7.5 GB at 20,000): `too_many_samples`.
    max_n: int = 10000
    max_loss: float = 0.1  # nats: keep samples the model predicts well (the paper: 0.1)
    drop_repeated_trigrams: bool = True  # LMs: drop tokens whose trigram appeared earlier in the doc (induction)
    stride: int = 50  # LMs: every stride-th token that passes (the paper: 50)
    context_tokens: int = 48  # LMs: tokens of context kept with each sample for the report


@dataclass
class GradConfig:
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))  # name substrings to drop
    include: str = ""  # regex a parameter name must match ("" = any)
    drop_embeddings: bool = True  # also drop the input/output embedding matrices by identity (see qdg_core)
    batch: int = 64  # LMs: tokens per batched backward


@dataclass
class SimConfig:
    mode: str = "exact"  # exact | projected (random projection to `dim`, as TRAK)
    dim: int = 4096  # projected: dimensions
    block: int = 256  # samples per gradient block
    max_grad_mb: int = 2048  # exact: gradient rows kept resident; more are streamed and recomputed
    # The paper's cosine keeps the sign. A gradient flips sign with the class it pushes towards, so
    # one mechanism can give two anti-aligned groups; signed=false uses |C| (lines, not directions).
    signed: bool = True
    check_samples: int = 256  # projected: samples on which the error against exact is measured
    save_max: int = 2000  # log the similarity matrix as well when n <= this


@dataclass
class ClusterConfig:
    counts: list[int] = field(default_factory=lambda: [400])
    # Planted quanta: also cluster at m x (subtasks among the samples) for each m listed.
    subtask_multiples: list[int] = field(default_factory=list)
    n_init: int = 30  # k-means restarts in sklearn's SpectralClustering (the paper: 30)
    fit_rank_min: int = 101  # rank-frequency fit over ranks [min, max] of the envelope (the paper: 101-1000)
    fit_rank_max: int = 1000  # 0 = up to the last rank


@dataclass
class Config(RunConfig):
    task: str = "quanta_discovery"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    grad: GradConfig = field(default_factory=GradConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # model.source=train: another task's config (train.task=sparse_parity, train.data.n_tasks=4, ...),
    # trained by this run with this run's trainer.* settings (and this run's seed unless train.seed is
    # given), then analysed.
    train: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=0))

    @property
    def fits(self) -> bool:  # a run trains (needs trainer.steps >= 1) only when it trains its own model
        return self.model.source == "train"

    def validate(self) -> None:
        super().validate()
        m, s, c, g = self.model, self.samples, self.cluster, self.sim
        if m.source not in SOURCES:
            raise ConfigError(f"model.source={m.source!r}; valid: {', '.join(SOURCES)}")
        if g.mode not in MODES:
            raise ConfigError(f"sim.mode={g.mode!r}; valid: {', '.join(MODES)}")
        if m.source == "artifact" and not m.artifact:
            raise ConfigError("model.source=artifact needs model.artifact=RUN_ID (the run that logged the model)")
        if m.source == "train" and not self.train.get("task"):
            raise ConfigError("model.source=train needs train.task=NAME and that task's keys as train.KEY=VALUE")
        if s.max_n < 2:
            raise ConfigError(f"samples.max_n={s.max_n}: the most samples to cluster, an integer >= 2")
        if s.n > s.max_n:
            raise ConfigError(too_many_samples(f"samples.n={s.n}", s.n, s.max_n))
        if s.n < 0 or s.stride < 1 or s.context_tokens < 0:
            raise ConfigError(
                f"samples.n={s.n}, samples.stride={s.stride}, samples.context_tokens={s.context_tokens}: "
                "need >= 0, >= 1, >= 0"
            )
        if min(g.dim, g.block, g.max_grad_mb, g.check_samples, self.grad.batch, c.n_init) < 1:
            raise ConfigError(
                "sim.dim, sim.block, sim.max_grad_mb, sim.check_samples, grad.batch, cluster.n_init must be >= 1"
            )
        if not c.counts and not c.subtask_multiples:
            raise ConfigError("cluster.counts is empty: give at least one cluster count")
        if any(k < 2 for k in c.counts) or any(k < 1 for k in c.subtask_multiples):
            raise ConfigError(f"cluster.counts={list(c.counts)}: each must be >= 2; cluster.subtask_multiples >= 1")
        too_many = [k for k in c.counts if s.n and k >= s.n]
        if too_many:
            raise ConfigError(
                f"cluster.counts={list(c.counts)}: {too_many} not below samples.n={s.n} "
                "(spectral clustering needs fewer clusters than samples)"
            )


def too_many_samples(what: str, n: int, max_n: int) -> str:
    # Memory the n x n similarity takes: the float32 matrix (4 n^2 bytes), the float64 copy that
    # sklearn's SpectralClustering validates it into and the Laplacian it builds from that (8 n^2 each).
    return (
        f"{what}: {n} samples > samples.max_n={max_n}; the {n} x {n} similarity and spectral clustering's "
        f"copies of it take ~{20 * n * n / 2**30:.1f} GiB (20 n^2 bytes); lower samples.n or raise "
        f"samples.max_n to {n} to ask for it"
    )
