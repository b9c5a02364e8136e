"""An offline stand-in for the Pythia suite: small GPT-NeoX models with Pythia's tokenizer, trained
briefly on local Pile text and saved as Hugging Face directories that `pythia_eval` loads.

Pythia weights cannot be downloaded here. With the real tokenizer, real architecture and real text,
the per-token analysis gets real (if small) scaling: `model.d_model` sets the size, depth and heads
follow it. Documents [0, data.train_docs) are trained on; the rest are held out for evaluation.
Checkpoints every `save_every` steps go to `<save_dir>/<name>/step<N>/`, the model's revisions.
"""

from __future__ import annotations

import json
import math
import os

import lightning as L
import torch
from torch import nn

from harness.config.run import data_dir
from harness.errors import ConfigError
from harness.training.data import DeviceDataModule
from harness.training.logs import TrainLossLog, write_summary
from harness.training.train import Job
from tasks.configs.pythia_suite import Config, ModelConfig, heads, layers
from tasks.lm import param_counts


def model_name(cfg: Config) -> str:
    return cfg.name or f"neox-d{cfg.model.d_model}"


def make_model(m: ModelConfig, vocab_rows: int) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_rows,
        hidden_size=m.d_model,
        num_hidden_layers=layers(m),
        num_attention_heads=heads(m),
        intermediate_size=4 * m.d_model,
        max_position_embeddings=m.context_length,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(config)


def padded_vocab(n: int, multiple: int = 128) -> int:
    # Pythia pads its 50281 ids to 50304 rows; the same rounding keeps matmuls aligned.
    return -(-n // multiple) * multiple


class PileWindows(DeviceDataModule):
    """Random training windows from the training documents; fixed held-out windows for val/loss."""

    def __init__(self, cfg: Config):
        super().__init__()
        import tokenizers

        root = data_dir(cfg)
        d = cfg.data
        self.cfg = cfg
        self.tok = tokenizers.Tokenizer.from_file(os.path.join(root, d.tokenizer))
        with open(os.path.join(root, d.source)) as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        if len(texts) <= d.train_docs:
            raise ConfigError(
                f"data.train_docs={d.train_docs}: {d.source} has only {len(texts)} documents, none left to hold out"
            )
        eos = self.tok.token_to_id("<|endoftext|>")

        def stream(docs: list[str]) -> torch.Tensor:  # documents joined by <|endoftext|>: [n_tokens]
            ids = [t for e in self.tok.encode_batch(docs) for t in e.ids + [eos]]
            return torch.tensor(ids, dtype=torch.long)

        self.train_ids = stream(texts[: d.train_docs])
        val = stream(texts[d.train_docs :])
        n = min(d.val_windows, len(val) // d.seq_len)
        self.val_ids = val[: n * d.seq_len].view(n, d.seq_len)  # [val_windows, seq_len]
        self.vocab_rows = padded_vocab(self.tok.get_vocab_size(with_added_tokens=True))

    def train_batch(self, index: int, device):
        d = self.cfg.data
        starts = torch.randint(0, len(self.train_ids) - d.seq_len, (d.batch_size,))
        return torch.stack([self.train_ids[s : s + d.seq_len] for s in starts.tolist()]).to(device)  # [b, seq_len]

    def val_batch(self, index: int, device):
        return self.val_ids.to(device)


class SuiteModule(L.LightningModule):
    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__()
        self.cfg, self.model = cfg, model
        self.train_log = TrainLossLog(cfg.trainer.log_every)

    def training_step(self, ids, batch_idx):
        loss = self.model(input_ids=ids, labels=ids).loss
        self.train_log.add(self.global_step, loss)  # at the steps completed before this one
        self.train_log.flush(self)
        return loss

    def validation_step(self, ids, batch_idx):
        self.log("val/loss", self.model(input_ids=ids, labels=ids).loss, on_epoch=True, batch_size=len(ids))

    def configure_optimizers(self):
        o, steps = self.cfg.optim, self.cfg.trainer.steps  # >= 1: a task that fits validates it
        # No weight decay on biases and layer norms (GPT-NeoX / nanoGPT convention).
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
        )

        def schedule(step: int) -> float:
            if step < o.warmup:
                return (step + 1) / o.warmup
            t = min(1.0, (step - o.warmup) / max(1, steps - o.warmup))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"},
        }


class SaveModel(L.Callback):
    """`<dir>/step<N>/` every `every` steps, and the final model in `<dir>/` itself."""

    def __init__(self, path: str, every: int):
        self.path, self.every = path, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0 and trainer.is_global_zero:
            pl_module.model.save_pretrained(os.path.join(self.path, f"step{step}"))

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            pl_module.model.save_pretrained(self.path)
            if self.every:
                pl_module.model.save_pretrained(os.path.join(self.path, f"step{trainer.global_step}"))
            write_summary(trainer, {"model/path": os.path.abspath(self.path)})


def build(cfg: Config) -> Job:
    data = PileWindows(cfg)
    model = make_model(cfg.model, data.vocab_rows)
    return Job(
        module=SuiteModule(cfg, model),
        datamodule=data,
        callbacks=[SaveModel(os.path.join(cfg.save_dir, model_name(cfg)), cfg.save_every)],
        summary={
            **param_counts(model),  # embed_in and embed_out are not tied here
            "model/layers": layers(cfg.model),
            "model/name": model_name(cfg),
            "data/train_tokens": len(data.train_ids),
            "loss_units": "nats",
        },
    )
