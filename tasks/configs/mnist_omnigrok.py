"""Config of the Omnigrok MNIST task (tasks/mnist_omnigrok.py).

Imports neither torch nor Lightning: `harness train task=mnist_omnigrok --cfg`, `harness tasks` and sweep
validation read this module only; the training code (tasks.mnist_omnigrok) is imported when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config.run import RunConfig, TrainerConfig
from harness.errors import ConfigError

# The module with build(cfg) -> Job, imported by the registry only when a run starts.
TRAINING = "tasks.mnist_omnigrok"

SPLITS = ("auto", "standard", "offline")
LOSSES = ("mse", "ce")


@dataclass
class DataConfig:
    # auto: standard if all four official files are present, else offline. standard: train on the
    # first n_train training images, test on the 10k test split. offline: only the test split exists;
    # train on its first n_train images, test on the rest. The run config records the resolved split.
    split: str = "auto"
    folder: str = "mnist"  # under the data directory (data_dir= or $HARNESS_DATA_DIR)
    download: bool = False  # fetch missing official files (checked by MD5) when the split needs them
    n_train: int = 1000  # the paper: the first 1000 training images
    n_test: int = 0  # held-out images to evaluate on; 0 = all of them
    batch_size: int = 200  # minibatch drawn on the device; >= n_train means full batch


@dataclass
class ModelConfig:
    width: int = 200  # hidden units per layer
    depth: int = 2  # hidden layers: 784-200-200-10
    init_scale: float = 8.0  # alpha: every initial parameter (weights and biases) times this
    save: bool = True  # log the final weights as W&B artifact model-<run id> (model.pt, contract C7)


@dataclass
class OptimConfig:
    loss: str = "mse"  # mse (against one-hot targets, the paper) | ce
    lr: float = 1.0e-3
    weight_decay: float = 0.01  # AdamW's decoupled decay, what pulls the norm back down
    beta1: float = 0.9
    beta2: float = 0.999
    # LU landscape: after every step rescale all parameters back to alpha x the standard-init norm.
    fixed_norm: bool = False


@dataclass
class EvalConfig:
    threshold: float = 0.99  # train accuracy for grok/t_train99 (Power et al.)
    # MNIST test accuracy tops out near 0.9, so t_val99 never happens: grok/t_val80 (first eval with
    # test accuracy >= this), grok/delay and grok/phase are measured against this threshold.
    val_threshold: float = 0.8
    max_delay: int = 1000  # steps between t_train99 and t_val80 that still count as comprehension
    chunk: int = 10000  # images per forward pass at evaluation


@dataclass
class Config(RunConfig):
    task: str = "mnist_omnigrok"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The paper's run: 1e5 steps in float64 (~22 min on one CPU thread; 32-true halves it).
    # 10 optimizer steps per Lightning batch: Lightning's per-batch hooks cost ~1-2 ms, a third of a
    # float32 step here (benchmarks/bench_mnist_omnigrok.py).
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(
            steps=100000, eval_every=500, log_every=100, precision="64-true", steps_per_batch=10
        )
    )

    def validate(self) -> None:
        super().validate()
        d, m, o, e = self.data, self.model, self.optim, self.eval
        if d.split not in SPLITS:
            raise ConfigError(f"data.split={d.split!r}: valid values are {', '.join(SPLITS)}")
        if o.loss not in LOSSES:
            raise ConfigError(f"optim.loss={o.loss!r}: valid values are {', '.join(LOSSES)}")
        if not 1 <= d.n_train <= 60000 or d.n_test < 0 or d.batch_size < 1:
            raise ConfigError(
                f"data.n_train={d.n_train}, data.n_test={d.n_test}, data.batch_size={d.batch_size}: "
                "need 1 <= n_train <= 60000, n_test >= 0, batch_size >= 1"
            )
        if m.width < 1 or m.depth < 1 or not m.init_scale > 0:
            raise ConfigError(
                f"model.width={m.width}, model.depth={m.depth}, model.init_scale={m.init_scale}: "
                "width and depth >= 1, init_scale > 0"
            )
        if not (0 < e.threshold <= 1 and 0 < e.val_threshold <= 1) or e.chunk < 1:
            raise ConfigError(
                f"eval.threshold={e.threshold}, eval.val_threshold={e.val_threshold}, "
                f"eval.chunk={e.chunk}: thresholds in (0, 1], chunk >= 1"
            )
