"""The long-context study: Gemma 3 270M (base) on 4k-32k tokens of the Paul Graham essays.

:mod:`.tasks` (documents with seven facts and five completion-style questions), :mod:`.capture`
(one chunked prefill per document that serves every question and method), :mod:`.grid` (the
resumable runner), :mod:`.report` (tables with Wilson intervals and paired counts against the full
cache, the README's generated blocks) and :mod:`.cost` (KV bytes, peak memory, prefill and decode
time at 8k-32k). ``python -m studies.long_context run|report|cost``; results in ``results/``,
narrative and tables in ``README.md``.
"""
