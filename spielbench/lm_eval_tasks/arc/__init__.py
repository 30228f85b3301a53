"""The ARC-Easy and ARC-Challenge task folder: its lm-eval YAML and its ``utils`` module."""
