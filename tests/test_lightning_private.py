"""The private Lightning names the harness relies on still exist (pyproject.toml pins lightning below the
next minor release because of them; this test says when a release moved them, before any run breaks)."""

from __future__ import annotations

import ast
import os

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from harness.training.train import optimizer_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Counting(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        (self.w * batch).sum().backward()
        optimizer_step(self, opt)
        optimizer_step(self, opt)  # two optimizer steps per batch, as tasks with steps_per_batch do

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(3, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_optimizer_step_counts_global_steps_through_the_private_hooks(tmp_path):
    assert callable(
        getattr(LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])), "_on_before_step", None)
    )
    module = _Counting()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module)
    assert trainer.global_step == 6  # 3 batches x 2 steps: the private counters were called
    assert abs(float(module.w) - (1 - 6 * 0.1)) < 1e-6  # and six SGD steps were taken


def test_the_signal_connector_flag_checkpoint_clears_exists(tmp_path):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    assert trainer._signal_connector.received_sigterm is False  # harness/training/checkpoint.py sets it


def test_no_private_lightning_import():
    """Private classes are not imported from lightning (only the attributes checked above are used)."""
    for root in ("harness", "tasks"):
        for dirpath, _, files in os.walk(os.path.join(REPO, root)):
            for name in (f for f in files if f.endswith(".py")):
                with open(os.path.join(dirpath, name)) as f:
                    tree = ast.parse(f.read())
                private = [
                    a.name
                    for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("lightning")
                    for a in n.names
                    if a.name.startswith("_")
                ]
                assert not private, f"{dirpath}/{name} imports private Lightning names {private}"
