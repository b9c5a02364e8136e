"""Shared spine of the sweep harness: config, tracking, training, sweeps and the run store."""
