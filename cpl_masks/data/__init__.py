"""Data: question sets (loading, validation, writing), the built-in demo set, and the split into M and I."""
