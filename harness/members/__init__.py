"""Runs as members of a block under one LightningModule: a solo run of a task that trains members is a
block of one; `harness train-packed` (the local controller's --pack) trains many, each its own W&B run."""
