"""lm-eval task definitions for the suite's offline benchmarks, one folder per task (docs/METHOD.md §8.5).

Layout, as lm-eval keeps its own tasks:

- ``<task>/spiel_<task>.yaml``: the lm-eval task config; ``<task>/utils.py``: its row normaliser,
  prompt building and scoring (``arc/`` holds ARC-Easy and ARC-Challenge, ``mmlu/`` the 5-shot and
  0-shot MMLU, as each pair shares its code). ``bbh/`` and ``tydiqa/`` hold a template
  (``_spiel_*_template_yaml``) from which one task per BBH task / TyDiQA language is generated.
- ``_spiel_mc_template_yaml``: the settings the multiple-choice tasks share; their YAMLs include it
  as ``../_spiel_mc_template_yaml`` (lm-eval resolves ``include`` against the including file's folder).
- :mod:`.common`: reading and checking data files, shared by every folder; :mod:`.rows`: the
  row-format table and the loader of the single-file tasks; :mod:`.registry`: the suite's task table,
  the rendering of an include folder and the data check before evaluation.

The YAMLs name their functions by full module path (``!function
spielbench.lm_eval_tasks.<task>.utils.<name>``). lm-eval first looks for that path as a file under
the YAML's own folder, then imports it as a module: the rendered include folder holds no Python,
so the package's module is imported, every folder's ``utils`` is a distinct module, and the
functions lm-eval calls are the ones :func:`.registry.check_tasks` checks with.

Data paths in the YAMLs are the placeholder ``@EVAL_DIR@``: the YAMLs are never used from this
folder directly but rendered, with the same folder tree, into an include folder with absolute paths
by :func:`.registry.render_tasks` (lm-eval resolves relative data paths against the working directory).
"""
