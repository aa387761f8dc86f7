"""stableflows.experiments."""
