"""The sweep harness, in rooms: config (run configs, task registry), training (one Lightning run logged to
W&B), members (many runs in one process), sweep (the local controller and W&B hand-off), runstore (runs back)."""
