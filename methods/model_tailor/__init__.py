"""Model Tailor: after each stage, a compensated patch of the most important updated entries."""
