"""GPU memory-reservation scheduler: inventory, estimator, ledger, placement policies."""
