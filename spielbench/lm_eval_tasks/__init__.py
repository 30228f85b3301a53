"""lm-eval task definitions for the suite's offline benchmarks (docs/METHOD.md §8.5).

The ``*.yaml`` files here are lm-eval task configs; ``_*_yaml`` files are templates that generated
subtask configs ``include``. Data paths inside them are the placeholder ``@EVAL_DIR@``: they are
never used from this folder directly but rendered into a temporary include folder with absolute
paths by :func:`spielbench.evaluate.render_tasks` (lm-eval resolves relative paths against the
working directory). Dataset loading, prompt building and scoring code lives in
:mod:`spielbench.lm_eval_tasks.utils`, which the YAMLs reference as ``!function
spielbench.lm_eval_tasks.utils.<name>``.
"""
