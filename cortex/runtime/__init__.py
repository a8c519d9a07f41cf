"""The model runtime: checkpoints, fragments and local generation (see docs/runtime.md)."""
