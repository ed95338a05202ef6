"""The testbed: a tiny Llama model trained on the synthetic suite, with its tokenizer.

The model itself ships inside the package, in ``chunkkv-testbed/`` beside this file (package data:
an installed wheel has it too; ``models/chunkkv-testbed`` in the repository points here), found by
:func:`chunkkv.cli_common.testbed_path` (``--model testbed``). This package also holds the code that
builds the tokenizer, the model config, the training data and the training loop
(``scripts/train_testbed.py`` is the entry point) and the evaluation helper.
"""
