"""stableflows.estimators."""
