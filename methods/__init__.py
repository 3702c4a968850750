"""Continual learning methods: one module, or one package, per method."""
