"""stableflows.audit."""
