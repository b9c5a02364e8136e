"""Per-token losses of a causal LM (Michaud et al. 2023: Pythia on The Pile), run through Lightning's
evaluation loop.

Every predicted token of the first `data.n_docs` documents (truncated to `data.context_length`) gets
its cross-entropy in nats, with its document index, position and token id, so that the tokens line up
across models that share a tokenizer. Rows go to parquet row groups as they are computed and become a
W&B artifact of type `per_token_losses`; the run summary holds the mean loss, the token count and the
total and non-embedding parameter counts.
"""
from __future__ import annotations

import ctypes
import glob
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from harness import tracking
from harness.callbacks import write_summary
from harness.config import ConfigError, RunConfig, TrainerConfig, data_dir
from harness.resources import data_root
from harness.train import Job

ARTIFACT_TYPE = "per_token_losses"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Embedding tables are often padded past the tokenizer (Pythia: 50304 rows for 50281 ids); more slack
# than this means the tokenizer belongs to another model.
VOCAB_SLACK = 128


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
        if self.model.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.model.dtype!r}; valid: {', '.join(DTYPES)}")
        d, e = self.data, self.eval
        # index < shards is checked in build(): sweeps validate each parameter on its own.
        if d.shard_index < 0 or d.num_shards < 1:
            raise ConfigError(f"data.shard_index={d.shard_index}, data.num_shards={d.num_shards}: need >= 0 and >= 1")
        if d.context_length < 2 or d.n_docs < 0 or d.first_doc < 0:
            raise ConfigError(f"data.context_length={d.context_length}, data.n_docs={d.n_docs}, "
                              f"data.first_doc={d.first_doc}: need >= 2, >= 0, >= 0")
        if e.batch_tokens < d.context_length:
            raise ConfigError(f"eval.batch_tokens={e.batch_tokens} < data.context_length={d.context_length}: "
                              "a full-length document must fit one batch")
        if not 0 <= e.max_padding <= 1:
            raise ConfigError(f"eval.max_padding={e.max_padding}: a share of the batch, between 0 and 1")
        if min(e.max_batch_docs, e.head_chunk, e.sort_buffer, e.row_group_rows) < 1 or e.vocab_tile < 0:
            raise ConfigError("eval.max_batch_docs, eval.head_chunk, eval.sort_buffer, eval.row_group_rows must be "
                              f">= 1 and eval.vocab_tile >= 0 (0: the whole vocabulary); got eval.vocab_tile={e.vocab_tile}")


# -- model and tokenizer -------------------------------------------------------------------------

def _local_path(path: str, cfg: RunConfig) -> str | None:
    if os.path.exists(path):
        return path
    root = data_root(cfg.data_dir)
    if root and not os.path.isabs(path) and os.path.exists(os.path.join(root, path)):
        return os.path.join(root, path)
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def local_model_dir(cfg: Config) -> str | None:
    """A local model directory; its `<revision>/` subdirectory when there is one (offline checkpoints)."""
    local = _local_path(cfg.model.name, cfg)
    if local and cfg.model.revision and os.path.isdir(os.path.join(local, cfg.model.revision)):
        return os.path.join(local, cfg.model.revision)
    return local


def load_model(cfg: Config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    m = cfg.model
    local = local_model_dir(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            local or m.name, revision=None if local else m.revision, dtype=DTYPES[m.dtype],
            local_files_only=bool(local) or _hub_offline())
    except (OSError, ValueError) as e:
        if local:
            raise ConfigError(f"model.name={m.name!r}: the local directory holds no loadable causal LM "
                              f"({str(e).splitlines()[0]})") from None
        raise ConfigError(f"model.name={m.name!r} revision={m.revision!r} cannot be loaded: it needs the "
                          "Hugging Face hub (unreachable or offline here) or a local model directory") from None
    return model.eval()


class Tokenizer:
    """A fast (Rust) tokenizer: documents -> token ids, ids -> text."""

    def __init__(self, backend, add_special_tokens: bool = False):
        self.backend, self.add_special = backend, add_special_tokens

    @property
    def size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str], max_len: int) -> list[list[int]]:
        return [e.ids[:max_len] for e in self.backend.encode_batch(texts, add_special_tokens=self.add_special)]

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(cfg: Config) -> Tokenizer:
    import tokenizers

    m = cfg.model
    if m.tokenizer:
        path = _local_path(m.tokenizer, cfg)
        if path is None or not os.path.isfile(path):
            raise ConfigError(f"model.tokenizer={m.tokenizer!r} is not a tokenizer.json file (relative paths are under data_dir)")
        return Tokenizer(tokenizers.Tokenizer.from_file(path), m.add_special_tokens)
    from transformers import AutoTokenizer

    local = local_model_dir(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(local or m.name, revision=None if local else m.revision,
                                            local_files_only=bool(local) or _hub_offline())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name={m.name!r} has no loadable tokenizer ({str(e).splitlines()[0]}); "
                          "set model.tokenizer=PATH/tokenizer.json") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ConfigError(f"the tokenizer of {m.name!r} is not a fast tokenizer; set model.tokenizer=PATH/tokenizer.json")
    return Tokenizer(tok.backend_tokenizer, m.add_special_tokens)


def check_vocab(model: nn.Module, tok: Tokenizer, names: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if tok.size > rows or rows - tok.size > VOCAB_SLACK:
        raise ConfigError(f"tokenizer and model do not match ({names}): the tokenizer has {tok.size} ids, "
                          f"the model's embedding {rows} rows")


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, non-embedding): Pythia's convention drops the input and output embeddings."""
    total = sum(p.numel() for p in model.parameters())
    emb = {id(p): p.numel() for mod in (model.get_input_embeddings(), model.get_output_embeddings())
           if mod is not None for p in mod.parameters()}
    return total, total - sum(emb.values())


# -- per-token losses ----------------------------------------------------------------------------

class TokenLosses(nn.Module):
    """Cross-entropy (nats, float32) of every next-token prediction of a causal LM.

    The unembedding runs only on real (unpadded) positions and `head_chunk` positions at a time, so
    the logits never exist for a whole batch ([batch, length, vocab] would be GBs for 50k vocabularies).
    Logits are made `vocab_tile` columns at a time into one buffer kept across calls, and the loss
    is computed in place (see `_chunk_losses`): a fresh [chunk, vocab] tensor per matmul costs ~35%
    of the matmul in page faults on a CPU, and F.cross_entropy allocates two more. Models whose logits are
    not `output_embeddings(base_model(x))` (soft-capping, scaling) use their own forward instead: the
    split is checked numerically once.

    Batches are right-padded, so under the causal mask no real position ever attends to padding and
    the attention mask need not reach the model (`mask_attention=False`): an explicit padding mask
    makes SDPA fall back from its causal kernel to the masked one (~1.7x slower attention on CPU).
    The mask still selects which positions are scored.
    """

    def __init__(self, lm: nn.Module, head_chunk: int = 512, mask_attention: bool = False, vocab_tile: int = 1024):
        super().__init__()
        self.lm, self.head_chunk, self.mask_attention = lm, head_chunk, mask_attention
        self.vocab_tile = vocab_tile
        self.split = self._split_matches()
        self._buffers: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> flat logits buffer

    def _split_matches(self) -> bool:
        head = self.lm.get_output_embeddings()
        if head is None or self.lm.base_model is self.lm or not isinstance(head, nn.Linear):
            return False
        ids = torch.arange(2, 10).unsqueeze(0)
        with torch.inference_mode():
            full = self.lm(input_ids=ids).logits.float()
            split = head(self.lm.base_model(input_ids=ids).last_hidden_state).float()
        return split.shape == full.shape and torch.allclose(split, full, atol=1e-4, rtol=1e-4)

    def _tile(self, dtype: torch.dtype, device: torch.device, rows: int, cols: int, tile: int) -> torch.Tensor:
        key = (dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.head_chunk * tile, dtype=dtype, device=device)
        return self._buffers[key][:rows * cols].view(rows, cols)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, L] right-padded ids and mask -> losses of the real targets, row-major: [n_targets]."""
        targets = input_ids[:, 1:]  # [b, L-1]
        real = attention_mask[:, 1:].bool()  # [b, L-1]
        mask = attention_mask if self.mask_attention else None
        if not self.split:
            logits = self.lm(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            return F.cross_entropy(logits[real].float(), targets[real], reduction="none")
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        hidden, targets = hidden[:, :-1][real], targets[real]  # [n, d], [n]
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for s in range(0, len(targets), self.head_chunk):
            out[s:s + self.head_chunk] = self._chunk_losses(hidden[s:s + self.head_chunk],
                                                            targets[s:s + self.head_chunk])
        return out

    def _chunk_losses(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log-sum-exp over the vocabulary minus the target logit, one vocabulary tile at a time
        (an online softmax, as flash attention does): the tile stays in cache through its four
        elementwise passes, where [chunk, 50k vocab] logits would stream from memory each time.
        Logits are computed in the model's dtype, as transformers does, and scored in float32."""
        head = self.lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        vocab, rows, device = weight.shape[0], len(h), h.device
        tile = min(self.vocab_tile or vocab, vocab)
        top = torch.full((rows,), -torch.inf, device=device)
        total = torch.zeros(rows, device=device)
        target = torch.empty(rows, device=device)
        index = torch.arange(rows, device=device)
        for v in range(0, vocab, tile):
            w = weight[v:v + tile]
            z = self._tile(weight.dtype, device, rows, len(w), tile)
            torch.mm(h, w.t(), out=z)
            if bias is not None:
                z += bias[v:v + tile]
            if z.dtype != torch.float32:
                z = self._tile(torch.float32, device, rows, len(w), tile).copy_(z)
            here = (t >= v) & (t < v + len(w))
            target[here] = z[index[here], t[here] - v]
            new_top = torch.maximum(top, z.amax(1))
            total.mul_(torch.exp(top - new_top)).add_(z.sub_(new_top[:, None]).exp_().sum(1))
            top = new_top
        return total.log_().add_(top).sub_(target)


# -- documents -----------------------------------------------------------------------------------

def iter_texts(source: str, text_key: str = "text", split: str = "test") -> Iterator[str]:
    """Documents of a JSONL(.zst) file, a folder of text files, or hf:NAME[:CONFIG], in order."""
    if source.startswith("hf:"):
        yield from _iter_hf(source[3:], text_key, split)
    elif os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if os.path.isfile(f))
        for f in files:
            with open(f, encoding="utf-8", errors="replace", newline="") as fh:
                yield fh.read()
    else:
        yield from _iter_jsonl(source, text_key)


def _iter_jsonl(path: str, text_key: str) -> Iterator[str]:
    with open(path, "rb") as raw:
        if path.endswith(".zst"):
            import zstandard

            raw = zstandard.ZstdDecompressor().stream_reader(raw)
        for i, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8")):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get(text_key), str):
                keys = ", ".join(doc) if isinstance(doc, dict) else type(doc).__name__
                raise ConfigError(f"{path}: line {i + 1} has no string field {text_key!r} (found: {keys}); "
                                  "set data.text_key")
            yield doc[text_key]


def _iter_hf(spec: str, text_key: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source=hf:... needs the `datasets` package (pip install datasets)") from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for "not found / offline"; say which in one line
        raise ConfigError(f"data.source=hf:{spec} split={split!r} cannot be loaded ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for doc in ds:
        if text_key not in doc:
            raise ConfigError(f"dataset {name}: no field {text_key!r} (found: {', '.join(doc)}); set data.text_key")
        yield doc[text_key]


def resolve_source(cfg: Config) -> str:
    src = cfg.data.source
    if src.startswith("hf:"):
        return src
    path = src if os.path.isabs(src) else os.path.join(data_dir(cfg), src)
    if not os.path.exists(path):
        raise ConfigError(f"data.source={src!r}: {path} does not exist (relative sources are under data_dir)")
    return path


def pack(docs: list[tuple[int, list[int]]], batch_tokens: int, max_docs: int,
         max_padding: float = 1.0) -> Iterator[list[tuple[int, list[int]]]]:
    """Greedy batches of documents sorted by length: padded size <= batch_tokens, and no document
    shorter than (1 - max_padding) x the batch's longest, so padding stays under that share."""
    docs = sorted(docs, key=lambda d: -len(d[1]))
    batch: list = []
    for doc in docs:
        longest = len(batch[0][1]) if batch else 0
        if batch and ((len(batch) + 1) * longest > batch_tokens or len(batch) == max_docs
                      or len(doc[1]) < (1 - max_padding) * longest):
            yield batch
            batch = []
        batch.append(doc)
    if batch:
        yield batch


def collate(batch: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
    n, width = len(batch), len(batch[0][1])
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, (_, toks) in enumerate(batch):
        ids[i, :len(toks)] = torch.tensor(toks)
        mask[i, :len(toks)] = 1
    return {"input_ids": ids, "attention_mask": mask, "doc": torch.tensor([d for d, _ in batch])}


class DocumentBatches(IterableDataset):
    """Padded batches of this shard's documents; only `sort_buffer` documents are held at a time."""

    def __init__(self, cfg: Config, tok: Tokenizer, source: str, slot: int, n_slots: int):
        self.cfg, self.tok, self.source, self.slot, self.n_slots = cfg, tok, source, slot, n_slots

    def documents(self) -> Iterator[tuple[int, str]]:
        d = self.cfg.data
        stop = d.first_doc + d.n_docs if d.n_docs else None
        for i, text in enumerate(iter_texts(self.source, d.text_key, d.split)):
            if stop is not None and i >= stop:
                return
            if i >= d.first_doc and (i - d.first_doc) % self.n_slots == self.slot:
                yield i, text

    def __iter__(self):
        buf: list[tuple[int, str]] = []
        for item in self.documents():
            buf.append(item)
            if len(buf) == self.cfg.eval.sort_buffer:
                yield from self._batches(buf)
                buf = []
        if buf:
            yield from self._batches(buf)

    def _batches(self, buf):
        e = self.cfg.eval
        ids = self.tok.encode([t for _, t in buf], self.cfg.data.context_length)
        docs = [(i, toks) for (i, _), toks in zip(buf, ids) if len(toks) >= 2]  # one token predicts nothing
        for batch in pack(docs, e.batch_tokens, e.max_batch_docs, e.max_padding):
            yield collate(batch)


def device_slot(shard: int, shards: int, rank: int, world: int) -> tuple[int, int]:
    """(slot, slots) of one device of one shard: document r (from first_doc) goes to slot r % slots.

    Laid out so that r stays in shard r % shards whatever the number of devices of each run.
    """
    return rank * shards + shard, shards * world


class PileDocs(L.LightningDataModule):
    def __init__(self, cfg: Config, tok: Tokenizer):
        super().__init__()
        self.cfg, self.tok = cfg, tok
        self.source = resolve_source(cfg)

    def val_dataloader(self) -> DataLoader:
        d, t = self.cfg.data, self.trainer
        slot, n_slots = device_slot(d.shard_index, d.num_shards, t.global_rank, t.world_size)
        ds = DocumentBatches(self.cfg, self.tok, self.source, slot, n_slots)
        return DataLoader(ds, batch_size=None, num_workers=0)


# -- output --------------------------------------------------------------------------------------

SCHEMA = pa.schema([("doc", pa.int64()), ("pos", pa.int32()), ("token", pa.int32()), ("loss", pa.float32())])


class RowWriter:
    """Appends (doc, pos, token, loss) rows to one parquet file, a row group at a time."""

    def __init__(self, path: str, row_group_rows: int):
        self.writer = pq.ParquetWriter(path, SCHEMA)
        self.rows, self.buffered, self.parts = row_group_rows, 0, []

    def add(self, **cols: np.ndarray) -> None:
        self.parts.append(cols)
        self.buffered += len(cols["loss"])
        if self.buffered >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            arrays = [pa.array(np.concatenate([p[f.name] for p in self.parts]), type=f.type) for f in SCHEMA]
            self.writer.write_table(pa.Table.from_arrays(arrays, schema=SCHEMA))
            self.parts, self.buffered = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


class PythiaEval(L.LightningModule):
    def __init__(self, cfg: Config, losses: TokenLosses):
        super().__init__()
        self.cfg, self.losses = cfg, losses
        self.writer: RowWriter | None = None
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.long)
        self.n_docs = 0

    def open_writer(self, path: str) -> None:
        self.writer = RowWriter(path, self.cfg.eval.row_group_rows)

    def validation_step(self, batch, batch_idx):
        with torch.inference_mode():
            ids, mask = batch["input_ids"], batch["attention_mask"]
            loss = self.losses(ids, mask)  # [n_targets], row-major over (doc, position)
        real = mask[:, 1:].bool()
        pos = torch.arange(1, ids.shape[1], device=ids.device).expand_as(real)
        doc = batch["doc"][:, None].expand_as(real)
        self.total += loss.double().sum().cpu()
        self.count += loss.numel()
        self.n_docs += len(ids)
        if self.writer is not None:
            self.writer.add(doc=doc[real].cpu().numpy(), pos=pos[real].cpu().numpy(),
                            token=ids[:, 1:][real].cpu().numpy(), loss=loss.cpu().numpy())


class PerTokenArtifact(L.Callback):
    """Opens one parquet file per device, and at the end logs them as one W&B artifact + the summary."""

    def __init__(self, metadata: dict):
        self.metadata, self.out_dir = metadata, None

    def on_validation_start(self, trainer, pl_module):
        out = None
        if trainer.is_global_zero:
            run = getattr(trainer.logger, "experiment", None)
            # Beside the run's files/ (not in it: W&B would upload them a second time as run files).
            out = os.path.join(os.path.dirname(run.dir), ARTIFACT_TYPE)
            os.makedirs(out, exist_ok=True)
        self.out_dir = trainer.strategy.broadcast(out, 0)
        d = pl_module.cfg.data
        pl_module.open_writer(os.path.join(self.out_dir, f"shard{d.shard_index:04d}-of{d.num_shards:04d}"
                                                         f"-rank{trainer.global_rank:02d}.parquet"))

    def on_validation_end(self, trainer, pl_module):
        pl_module.writer.close()
        total = float(trainer.strategy.reduce(pl_module.total.to(pl_module.device), reduce_op="sum"))
        count = int(trainer.strategy.reduce(pl_module.count.to(pl_module.device), reduce_op="sum"))
        docs = int(trainer.strategy.reduce(torch.tensor(pl_module.n_docs, device=pl_module.device), reduce_op="sum"))
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return
        summary = {"eval/mean_loss": total / count if count else float("nan"), "eval/tokens": count, "eval/docs": docs}
        write_summary(trainer, summary)
        run = trainer.logger.experiment
        tracking.log_artifact(run, self.out_dir, f"{ARTIFACT_TYPE}-{run.id}", ARTIFACT_TYPE,
                              metadata={**self.metadata, **summary, "columns": SCHEMA.names})


def bound_heap() -> None:
    """Keep peak memory flat over long evaluations (glibc only).

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after
    which the activations of batches of varying shapes come from the heap and fragment it: peak RSS
    grew 755 -> 952 MiB from 50 to 200 documents. A fixed threshold keeps blocks of 128 KiB and up
    in mmap, given back to the system when freed.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # musl and other libcs: nothing to do
            pass


def build(cfg: Config) -> Job:
    if cfg.data.shard_index >= cfg.data.num_shards:
        raise ConfigError(f"data.shard_index={cfg.data.shard_index} with data.num_shards={cfg.data.num_shards}: "
                          "need index < shards")
    bound_heap()
    model = load_model(cfg)
    tok = load_tokenizer(cfg)
    check_vocab(model, tok, f"model.name={cfg.model.name!r}, model.tokenizer={cfg.model.tokenizer or 'its own'!r}")
    total, non_emb = param_counts(model)
    data = PileDocs(cfg, tok)
    summary = {"model/params": total, "model/params_nonembedding": non_emb, "model/name": cfg.model.name,
               "model/revision": cfg.model.revision, "tokenizer/size": tok.size, "loss_units": "nats"}
    return Job(module=PythiaEval(cfg, TokenLosses(model, cfg.eval.head_chunk, cfg.eval.mask_attention, cfg.eval.vocab_tile)), datamodule=data,
               callbacks=[PerTokenArtifact(dict(summary))], stage="validate", summary=summary)
