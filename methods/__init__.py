"""Continual learning methods, one module each."""
