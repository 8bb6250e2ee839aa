"""Evaluation: learned and forgotten, question by question, and paired statistics between methods."""
