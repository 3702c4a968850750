"""Analyses of models and runs: linear CKA, alpha sweeps, and the ``clbench analyze`` command."""
