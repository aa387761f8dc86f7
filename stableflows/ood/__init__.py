"""stableflows.ood."""
