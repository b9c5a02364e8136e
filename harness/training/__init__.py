"""One Lightning run logged to W&B: the trainer and its step axis, checkpoints and preemption, data
on the device, what a run logs (metrics, curves, event detectors), the W&B run's lifecycle."""
