"""Measuring models: `nbdiff bench` and `nbdiff eval`.

`bench` (every decoding method side by side with transformers' `generate()` on shipped prompt
suites), `metrics` (generative perplexity, distinct-n, agreement with the AR reply), `harness` (an
lm-evaluation-harness model registered as `nbdiff`; `python -m nbdiff.eval.harness`) and `humaneval`
(HumanEval offline, with the nbdiff decoder).
"""
