"""The BIG-Bench Hard (user files) task folder: its lm-eval YAML and its ``utils`` module."""
