"""The TyDiQA GoldP (user files) task folder: its lm-eval YAML and its ``utils`` module."""
