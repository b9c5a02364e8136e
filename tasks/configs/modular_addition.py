"""Config of the modular arithmetic task (tasks/modular_addition.py).

Imports neither torch nor Lightning: `harness train task=modular_addition --cfg`, `harness tasks` and sweep
validation read this module only; the training code (tasks.modular_addition) is imported when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config.run import RunConfig, TrainerConfig
from harness.errors import ConfigError

# The module with build(cfg) -> Job, imported by the registry only when a run starts.
TRAINING = "tasks.modular_addition"

OPERATIONS = ("add", "subtract", "multiply")
MODELS = ("pair_mlp", "concat_mlp")
ACTIVATION_NAMES = ("relu", "gelu", "tanh", "quadratic")  # tasks.modular_models.ACTIVATIONS
INITS = ("haiku", "torch")
LOSSES = ("ce_over_p", "ce")


@dataclass
class DataConfig:
    p: int = 67  # modulus (vocabulary size)
    operation: str = "add"  # add | subtract | multiply
    symmetric: bool = True  # only pairs a <= b (needs a commutative operation)
    train_fraction: float = 0.4  # of all pairs; the rest is the validation set
    split_seed: int = -1  # seed of the train/val split; -1 = the run's seed
    batch_size: int = 0  # 0 = full batch; else sampled with replacement each step


@dataclass
class ModelConfig:
    # pair_mlp: logits = E W_out relu(W_in (E[a] + E[b])), one E [p, embed_dim] for inputs and output (PAIR).
    # concat_mlp: logits = U act(W [E[a]; E[b]]), a free unembedding U. `bias` adds biases to both.
    name: str = "pair_mlp"
    embed_dim: int = 500
    hidden: int = 24
    activation: str = "relu"  # relu | gelu | tanh | quadratic
    # haiku: the PAIR notebook's initialisers. Embedding: VarianceScaling(2), truncated normal with
    # std sqrt(2 / p) (fan_in = p); linear maps: hk.Linear's TruncatedNormal(1 / sqrt(fan_in)), cut at
    # 2 sigma without rescaling (std 0.88 / sqrt(fan_in)). Initial norm ~37.4, as the notebook logs.
    # torch: PyTorch's defaults.
    init: str = "haiku"
    init_scale: float = 1.0  # every initial weight is multiplied by this (Omnigrok's alpha)
    bias: bool = False  # biases on the hidden and output layers (PAIR's formula has none)
    save: bool = True  # log the final weights as W&B artifact model-<run id> (model.pt, contract C7)


@dataclass
class OptimConfig:
    lr: float = 1.0e-3
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1.0e-8
    # ce_over_p: cross-entropy / p, as the reference code (its mean runs over the p logits too). With
    # AdamW this only moves where eps starts to damp the updates once the loss is tiny.
    loss: str = "ce_over_p"


@dataclass
class EvalConfig:
    threshold: float = 0.99  # Power et al.: t_train99 / t_val99 are the first steps at this accuracy
    max_delay: int = 1000  # steps from t_train to t_val still counted as comprehension, not grokking
    key_mass: float = 0.9  # key frequencies: fewest holding this share of the embedding's power ...
    max_keys: int = 8  # ... but at most this many
    # Record every frequency's power (p // 2 of them) and key membership at each evaluation, in the
    # run's curves artifact (fourier.parquet); history keeps fourier/n_keys and fourier/key_power.
    log_spectrum: bool = True


@dataclass
class Config(RunConfig):
    task: str = "modular_addition"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # 50 optimizer steps per Lightning batch: Lightning's ~1 ms of hooks per batch is half of this
    # full-batch step on a CPU; amortised it costs ~1% (benchmarks/bench_modular_addition.py).
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(steps=50000, eval_every=100, log_every=100, steps_per_batch=50)
    )

    def validate(self) -> None:
        super().validate()
        d, m, o = self.data, self.model, self.optim
        if d.p < 2:
            raise ConfigError(f"data.p={d.p}: the modulus must be >= 2")
        if not 0 < d.train_fraction < 1:
            raise ConfigError(f"data.train_fraction={d.train_fraction}: must lie strictly between 0 and 1")
        _one_of("data.operation", d.operation, OPERATIONS)
        _one_of("model.name", m.name, MODELS)
        _one_of("model.activation", m.activation, ACTIVATION_NAMES)
        _one_of("model.init", m.init, INITS)
        _one_of("optim.loss", o.loss, LOSSES)
        if d.symmetric and d.operation == "subtract":
            raise ConfigError(
                "data.symmetric=true with data.operation=subtract: subtraction is not "
                "commutative; set data.symmetric=false"
            )
        n = d.p * (d.p + 1) // 2 if d.symmetric else d.p * d.p
        n_train = round(d.train_fraction * n)
        if not 1 <= n_train < n:
            raise ConfigError(
                f"data.train_fraction={d.train_fraction} of {n} pairs leaves {n_train} "
                f"train and {n - n_train} validation pairs: both must be >= 1"
            )
        if d.batch_size < 0 or m.embed_dim < 1 or m.hidden < 1:
            raise ConfigError(
                f"data.batch_size={d.batch_size}, model.embed_dim={m.embed_dim}, "
                f"model.hidden={m.hidden}: need >= 0, >= 1, >= 1"
            )
        if not 0 < self.eval.threshold <= 1 or self.eval.max_keys < 1:
            raise ConfigError(
                f"eval.threshold={self.eval.threshold}, eval.max_keys={self.eval.max_keys}: "
                "need 0 < threshold <= 1 and max_keys >= 1"
            )


def _one_of(key: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")
