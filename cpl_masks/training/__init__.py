"""Training: the one loop every method runs through, and the run around it (request, folder, record, evaluation)."""
