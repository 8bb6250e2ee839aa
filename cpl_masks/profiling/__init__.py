"""Profiling: gradients over M and I turned into a freeze mask, its controls, and retain sets."""
