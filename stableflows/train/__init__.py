"""stableflows.train."""
