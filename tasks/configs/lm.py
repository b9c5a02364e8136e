"""Configs of the language-model toolkit (tasks/lm.py): model, documents, and both with a data dir.

Not a task: the Pythia evaluation and quanta discovery configs are built from these. Imports
neither torch nor Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # tasks.lm.DTYPES


@dataclass
class ModelConfig:
    name: str = "EleutherAI/pythia-70m"  # hub name, or a local directory (relative: cwd, then data_dir)
    # Hub revision: Pythia checkpoints are stepN (0 .. 143000). A local directory uses its
    # `<revision>/` subdirectory when it has one (the offline suite saves checkpoints that way).
    revision: str = "step143000"
    dtype: str = "float32"  # float32 | bfloat16 | float16 (the loss itself is computed in float32)
    tokenizer: str = ""  # "" = the model's own; else a tokenizer.json (relative: under data_dir)
    add_special_tokens: bool = False  # Pythia adds none; models that expect a BOS token want True


@dataclass
class DataConfig:
    # A .jsonl or .jsonl.zst file (one {"text": ...} per line), a folder of text files (one document
    # each, sorted by name), or hf:NAME[:CONFIG] for a Hugging Face dataset. Relative: under data_dir.
    source: str = "pile/test.jsonl.zst"
    text_key: str = "text"
    split: str = "test"  # Hugging Face dataset split
    first_doc: int = 0  # skip this many documents
    n_docs: int = 10000  # then take this many (0 = all)
    context_length: int = 1024  # documents are truncated to this many tokens
    num_shards: int = 1  # split the documents across runs: doc first_doc + r goes to shard r % num_shards
    shard_index: int = 0


@dataclass
class LMSource:
    """A model and its documents, for a task whose own config spells them differently (quanta_discovery)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    data_dir: str | None = None  # relative model, tokenizer and document paths are under it
