"""The BoolQ task folder: its lm-eval YAML and its ``utils`` module."""
