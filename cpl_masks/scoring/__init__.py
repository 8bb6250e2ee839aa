"""Scoring: how a model answers a question, and the answer loss that training descends."""
