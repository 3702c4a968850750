"""LLaVA-c (spectral-aware consolidation + unsupervised inquiry regularization) and its family."""
