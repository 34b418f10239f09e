"""Pictures: loss curves, reconstructions (matplotlib's object API; no global pyplot state)."""
