"""The real-model quality grid: SmolLM2-135M-Instruct on the Paul Graham essays, every method x budget.

Three modules: :mod:`.tasks` (needle, multi-key, variable-tracking and in-context-labelling tasks in
natural language that the small model solves with the full cache), :mod:`.grid` (the resumable
runner: one prefill per sample for every configuration, the query-aware configurations decoded as
one batch) and :mod:`.report` (tables with Wilson intervals, plots, the README's generated block).
``python -m studies.real_grid run ...`` / ``python -m studies.real_grid report ...``; results in
``results/``, narrative and tables in ``README.md``. The chunked-prefill grid (``run --grid
chunked``) reports into ``studies/memory``.
"""
