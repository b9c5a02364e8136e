"""Config of the tiny GPT-NeoX suite task (tasks/pythia_suite.py).

Imports neither torch nor Lightning: `harness train task=pythia_suite --cfg`, `harness tasks` and sweep
validation read this module only; the training code (tasks.pythia_suite) is imported when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.config.run import RunConfig, TrainerConfig
from harness.errors import ConfigError

# The module with build(cfg) -> Job, imported by the registry only when a run starts.
TRAINING = "tasks.pythia_suite"


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 0  # 0 = max(1, d_model // 32)
    n_heads: int = 0  # 0 = max(1, d_model // 32)
    context_length: int = 1024  # position limit of the saved model (rotary: no extra parameters)
    # The final weights as W&B artifact model-<run id> too (off: SaveModel already writes save_dir,
    # which pythia_eval reads, and the default model is ~26 MB, mostly embeddings).
    save: bool = False


@dataclass
class DataConfig:
    source: str = "pile/pile_100.jsonl"  # JSONL with a `text` field, under data_dir
    tokenizer: str = "pythia/tokenizer.json"  # under data_dir
    train_docs: int = 80  # documents [0, train_docs) train; the others are held out
    seq_len: int = 128  # tokens per training window
    batch_size: int = 4
    val_windows: int = 32  # held-out windows of seq_len for val/loss


@dataclass
class OptimConfig:
    lr: float = 3.0e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup: int = 20  # linear warmup steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1


@dataclass
class Config(RunConfig):
    task: str = "pythia_suite"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    save_dir: str = "out/pythia_suite"  # relative to the working directory
    name: str = ""  # model directory name; "" = neox-d<d_model>
    save_every: int = 0  # also save step<N>/ checkpoints every N steps (0 = only the final model)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=200, eval_every=100, log_every=10))

    def validate(self) -> None:
        super().validate()
        m = self.model
        if m.d_model < 1 or m.n_layers < 0 or m.n_heads < 0:
            raise ConfigError(
                f"model.d_model={m.d_model}, model.n_layers={m.n_layers}, model.n_heads={m.n_heads}: need >= 1, >= 0, >= 0"
            )
        if m.d_model % heads(m):
            raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={heads(m)}")
        d = self.data
        if min(d.train_docs, d.seq_len, d.batch_size, d.val_windows) < 1 or d.seq_len > m.context_length:
            raise ConfigError(
                f"data.train_docs={d.train_docs}, data.seq_len={d.seq_len}, data.batch_size={d.batch_size}, "
                f"data.val_windows={d.val_windows}: need >= 1, and seq_len <= model.context_length"
            )
        if self.save_every < 0:
            raise ConfigError(f"save_every={self.save_every}: need >= 0")


def layers(m: ModelConfig) -> int:
    return m.n_layers or max(1, m.d_model // 32)


def heads(m: ModelConfig) -> int:
    return m.n_heads or max(1, m.d_model // 32)
