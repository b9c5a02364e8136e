"""One module per task: config dataclass + pure nn.Module + DataModule + LightningModule + build()."""
