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
import itertools
import os
import sys
from collections.abc import Iterator

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset

from harness.errors import ConfigError
from harness.training import tracking
from harness.training.logs import write_summary
from harness.training.train import Job
from tasks.configs.pythia_eval import Config
from tasks.lm import (
    Tokenizer,
    TokenLosses,
    documents,
    load_model_and_tokenizer,
    param_counts,
    resolve_source,
)

ARTIFACT_TYPE = "per_token_losses"


def pack(
    docs: list[tuple[int, list[int]]], batch_tokens: int, max_docs: int, max_padding: float = 1.0
) -> Iterator[list[tuple[int, list[int]]]]:
    """Greedy batches of documents sorted by length: padded size <= batch_tokens, and no document
    shorter than (1 - max_padding) x the batch's longest, so padding stays under that share."""
    docs = sorted(docs, key=lambda d: -len(d[1]))
    batch: list = []
    for doc in docs:
        longest = len(batch[0][1]) if batch else 0
        if batch and (
            (len(batch) + 1) * longest > batch_tokens
            or len(batch) == max_docs
            or len(doc[1]) < (1 - max_padding) * longest
        ):
            yield batch
            batch = []
        batch.append(doc)
    if batch:
        yield batch


def collate(batch: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded ids and attention mask (0 on padding) of the batch's documents, and their indices."""
    ids = pad_sequence([torch.tensor(toks) for _, toks in batch], batch_first=True)
    mask = pad_sequence([torch.ones(len(toks), dtype=torch.long) for _, toks in batch], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask, "doc": torch.tensor([d for d, _ in batch])}


class DocumentBatches(IterableDataset):
    """Padded batches of this shard's documents; only `sort_buffer` documents are held at a time."""

    def __init__(self, cfg: Config, tok: Tokenizer, source: str, slot: int, n_slots: int):
        self.cfg, self.tok, self.source, self.slot, self.n_slots = cfg, tok, source, slot, n_slots

    def __iter__(self):
        e, texts = self.cfg.eval, documents(self.source, self.cfg.data, self.slot, self.n_slots)
        while buf := list(itertools.islice(texts, e.sort_buffer)):
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
        self.writer.add(  # opened by PerTokenArtifact.on_validation_start
            doc=doc[real].cpu().numpy(),
            pos=pos[real].cpu().numpy(),
            token=ids[:, 1:][real].cpu().numpy(),
            loss=loss.cpu().numpy(),
        )


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
        name = f"shard{d.shard_index:04d}-of{d.num_shards:04d}-rank{trainer.global_rank:02d}.parquet"
        pl_module.writer = RowWriter(os.path.join(self.out_dir, name), pl_module.cfg.eval.row_group_rows)

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
        tracking.log_artifact(
            run,
            self.out_dir,
            f"{ARTIFACT_TYPE}-{run.id}",
            ARTIFACT_TYPE,
            metadata={**self.metadata, **summary, "columns": SCHEMA.names},
        )


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
        raise ConfigError(
            f"data.shard_index={cfg.data.shard_index} with data.num_shards={cfg.data.num_shards}: need index < shards"
        )
    bound_heap()
    model, tok = load_model_and_tokenizer(cfg)
    summary = {
        **param_counts(model),
        "model/name": cfg.model.name,
        "model/revision": cfg.model.revision,
        "tokenizer/size": tok.size,
        "loss_units": "nats",
    }
    return Job(
        datamodule=PileDocs(cfg, tok),  # a missing data.source fails here, before the losses' first forward
        module=PythiaEval(cfg, TokenLosses(model, cfg.eval.head_chunk, cfg.eval.mask_attention, cfg.eval.vocab_tile)),
        callbacks=[PerTokenArtifact(dict(summary))],
        stage="validate",
        summary=summary,
    )
