"""Experiment bookkeeping: evaluation of run folders, sweeps and their results tables.

Builds on `gating.training`; the library's layers never import it.
"""
