"""Pretraining: run configuration and the training loop (not imported by `import m3ae`)."""
