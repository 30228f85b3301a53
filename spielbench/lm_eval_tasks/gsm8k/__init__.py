"""The GSM8K task folder: its lm-eval YAML and its ``utils`` module."""
