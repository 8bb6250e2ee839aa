"""Masks: the file format of freeze masks and retain sets, its untrusted reading, bits, algebra and statistics."""
