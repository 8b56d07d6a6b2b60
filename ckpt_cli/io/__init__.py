"""Readers and writers of checkpoint formats. Nothing here knows a model family."""
