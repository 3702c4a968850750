"""Suites, tasks, loaders, scorers and the micro world."""
