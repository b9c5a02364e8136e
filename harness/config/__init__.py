"""Typed run configs built from `key=value` overrides, the task registry (entry points), and the
resources a run may use (CPUs, the data directory). Imports neither torch nor Lightning."""
