"""Config of the multitask sparse parity task (tasks/sparse_parity.py).

Imports neither torch nor Lightning: `harness train task=sparse_parity --cfg`, `harness tasks` and sweep
validation read this module only; the training code (tasks.sparse_parity) is imported when a run starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.config.run import RunConfig, TrainerConfig
from harness.errors import ConfigError

# The module with build(cfg) -> Job, imported by the registry only when a run starts.
TRAINING = "tasks.sparse_parity"


@dataclass
class DataConfig:
    n_tasks: int = 100  # number of subtasks (control bits)
    n: int = 50  # data bits
    k: int = 3  # bits per parity subset
    # The paper's alpha: p_t ~ (t + offset)^-(zipf_alpha + 1). The original code's key `alpha` is
    # zipf_alpha + 1.
    zipf_alpha: float = 0.4
    offset: float = 0.0  # the paper's `offset`: shifts the rank (flattens the head of the distribution)
    # Seed of the subsets and test sets: -1 follows the run's `seed` (the paper draws them from the
    # run seed); >= 0 fixes one draw for every run that sets it (sweeps comparing widths on one draw).
    task_seed: int = -1
    # Seed of the training batches (and, in finite-data mode, of the D samples and their epoch order):
    # -1 follows the run's `seed`; >= 0 feeds every run that sets it the same batches, whatever its
    # seed or width (a width sweep then shares one batch per step when packed: tasks.sparse_parity.SparseParityBlock).
    stream_seed: int = -1
    # D: 0 = infinite data (a fresh batch each step); else D samples, reshuffled every epoch, the
    # last batch of an epoch smaller when batch_size does not divide D (the paper's loader).
    n_train_samples: int = 0
    batch_size: int = 10000


@dataclass
class ModelConfig:
    width: int = 100  # hidden units per layer
    depth: int = 1  # hidden layers
    save: bool = True  # log the final weights as W&B artifact model-<run id> (model.pt, contract C7)


@dataclass
class OptimConfig:
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999


@dataclass
class EvalConfig:
    test_per_task: int = 1000  # fixed test points per subtask
    threshold_bits: float = 0.1  # a subtask counts as learned below this loss (bits)
    chunk: int = 65536  # test points per forward pass


@dataclass
class Config(RunConfig):
    task: str = "sparse_parity"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(steps=25000, eval_every=500, steps_per_batch=10)
    )

    def validate(self) -> None:
        super().validate()
        d = self.data
        if d.n_tasks < 1 or d.n < 1 or d.k < 1:
            raise ConfigError(f"data.n_tasks={d.n_tasks}, data.n={d.n}, data.k={d.k}: all must be >= 1")
        if d.k > d.n:
            raise ConfigError(f"data.k={d.k} > data.n={d.n}: a parity subset cannot exceed the data bits")
        if math.comb(d.n, d.k) < d.n_tasks:
            raise ConfigError(
                f"data.n_tasks={d.n_tasks} > C(n={d.n}, k={d.k}) = {math.comb(d.n, d.k)} distinct subsets"
            )
        if d.task_seed < -1 or d.stream_seed < -1 or d.offset <= -1:
            raise ConfigError(
                f"data.task_seed={d.task_seed}, data.stream_seed={d.stream_seed}, data.offset={d.offset}: "
                "the seeds are -1 (follow seed) or >= 0; offset must be > -1 (ranks t + offset start above 0)"
            )
        if d.batch_size < 1 or d.n_train_samples < 0:
            raise ConfigError(
                f"data.batch_size={d.batch_size}, data.n_train_samples={d.n_train_samples}: need >= 1 and >= 0"
            )
        if self.model.width < 1 or self.model.depth < 1:
            raise ConfigError(f"model.width={self.model.width}, model.depth={self.model.depth}: both must be >= 1")
