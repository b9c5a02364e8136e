"""Config of the Pythia per-token evaluation task (tasks/pythia_eval.py).

Imports neither torch nor Lightning: `harness train task=pythia_eval --cfg`, `harness tasks` and sweep
validation read this module only; the training code (tasks.pythia_eval) is imported when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from harness.config.run import RunConfig, TrainerConfig
from harness.errors import ConfigError
from tasks.configs.lm import DTYPE_NAMES, DataConfig, ModelConfig

# The module with build(cfg) -> Job, imported by the registry only when a run starts.
TRAINING = "tasks.pythia_eval"


@dataclass
class EvalConfig:
    batch_tokens: int = 8192  # padded tokens per forward pass
    max_batch_docs: int = 64
    # Largest share of a batch that may be padding: the transformer runs on padded positions, so
    # batching a 100-token document with a 1024-token one costs more than running it alone.
    max_padding: float = 0.1
    # Positions per unembedding matmul, and vocabulary entries per matmul (0: all): the logits buffer
    # is head_chunk x vocab_tile floats, reused. On a CPU 512 x 1024 (2 MiB) keeps the matmul fast
    # and the softmax in cache; a GPU wants thousands of positions and the whole vocabulary.
    head_chunk: int = 512
    vocab_tile: int = 1024
    mask_attention: bool = False  # pass the padding mask to the model too (see TokenLosses)
    sort_buffer: int = 256  # documents read ahead and sorted by length (bounds host memory)
    row_group_rows: int = 262144  # parquet rows per row group


@dataclass
class Config(RunConfig):
    task: str = "pythia_eval"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=0))
    fits: ClassVar[bool] = False  # evaluation only: trainer.steps stays 0

    def validate(self) -> None:
        super().validate()
        if self.model.dtype not in DTYPE_NAMES:
            raise ConfigError(f"model.dtype={self.model.dtype!r}; valid: {', '.join(DTYPE_NAMES)}")
        d, e = self.data, self.eval
        # index < shards is checked in build(): sweeps validate each parameter on its own.
        if d.shard_index < 0 or d.num_shards < 1:
            raise ConfigError(f"data.shard_index={d.shard_index}, data.num_shards={d.num_shards}: need >= 0 and >= 1")
        if d.context_length < 2 or d.n_docs < 0 or d.first_doc < 0:
            raise ConfigError(
                f"data.context_length={d.context_length}, data.n_docs={d.n_docs}, "
                f"data.first_doc={d.first_doc}: need >= 2, >= 0, >= 0"
            )
        if e.batch_tokens < d.context_length:
            raise ConfigError(
                f"eval.batch_tokens={e.batch_tokens} < data.context_length={d.context_length}: "
                "a full-length document must fit one batch"
            )
        if not 0 <= e.max_padding <= 1:
            raise ConfigError(f"eval.max_padding={e.max_padding}: a share of the batch, between 0 and 1")
        if min(e.max_batch_docs, e.head_chunk, e.sort_buffer, e.row_group_rows) < 1 or e.vocab_tile < 0:
            raise ConfigError(
                "eval.max_batch_docs, eval.head_chunk, eval.sort_buffer, eval.row_group_rows must be "
                f">= 1 and eval.vocab_tile >= 0 (0: the whole vocabulary); got eval.vocab_tile={e.vocab_tile}"
            )
