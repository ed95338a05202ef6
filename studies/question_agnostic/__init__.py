"""The question-agnostic studies: how well each scoring keeps answers when a document is compressed
before any question is known, what it costs, and how the default (hybrid scoring on sentence
chunks, :mod:`chunkkv.agnostic`) was chosen. SmolLM2-135M-Instruct on the Paul Graham essays.

Modules, one study each (``python -m studies.question_agnostic <name> --help``):

* :mod:`.niah` — the decoded NIAH runs: 4 needles per document, every scoring x method x budget
  built from one prefill, 4 questions per compressed cache (test and held-out needles);
* :mod:`.table` — the tables (Wilson intervals) of the niah records;
* :mod:`.tune` — the chunking / sentence-score dev set (surprisal; no decoding);
* :mod:`.shallow_dev` — which layers' reconstruction attention keeps answers (dev set);
* :mod:`.plain_dev` — sentence scores on plainly worded dev needles;
* :mod:`.cost` — the scoring cost over the prefill, through ``chunkkv.compress``;
* :mod:`.saved_demo` — compress once, save, reload in a new process, same answers.

Results in ``results/``, narrative and tables in ``README.md``.
"""
