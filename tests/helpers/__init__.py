"""Test helpers: `tiny_models` builds every tiny model the tests use (random Llamas, bigram Llamas with
a character tokenizer, the enumerable toys), `laws` computes the toys' exact laws and the
sampling-noise yardsticks. Imported as `helpers.*` (pyproject: pytest pythonpath = tests)."""
