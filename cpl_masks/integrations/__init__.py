"""Integrations: a freeze mask or a retain set inside transformers' ``Trainer``, TRL or any PyTorch loop."""
