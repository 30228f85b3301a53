"""The MMLU (5-shot and 0-shot) task folder: its lm-eval YAML and its ``utils`` module."""
