"""Each task's config dataclasses, one torch-free module per task (the registry's entry points)."""
