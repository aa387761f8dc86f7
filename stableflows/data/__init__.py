"""stableflows.data."""
