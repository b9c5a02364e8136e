"""One module per task, `build(cfg) -> Job`: sparse parity, modular addition and Omnigrok define a block of
members (model with a member dimension, data, loss, evaluation, detectors; `build_block(cfgs)`) whose
block of one is a solo run; the others a LightningModule and its data."""
