"""Builders for ready-made data sets."""
