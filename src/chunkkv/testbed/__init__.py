"""The testbed: a tiny Llama model trained on the synthetic suite, with its tokenizer.

``models/chunkkv-testbed`` in the repository holds the trained weights; this package holds the
code that builds the tokenizer, the model config, the training data and the training loop
(``scripts/train_testbed.py`` is the entry point) and the evaluation helper.
"""
