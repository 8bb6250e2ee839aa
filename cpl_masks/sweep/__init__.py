"""Sweeps: every method at every learning rate, judged under a forgetting budget."""
