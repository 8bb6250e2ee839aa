"""Shared components: atomic files and locks, distributed ranks, progress bars, package versions."""
