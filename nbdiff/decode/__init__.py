"""Decoding: how a block-diffusion model turns a prompt into tokens (`generate`, `chat`, `visualize`).

`options` (`DecodeOptions`, one dataclass for every caller), `decoder` (the block loop and its named
steps, a generator of `events`), `context` (the KV cache, positions and masks of the committed
context), `exact` (verification of drafted blocks by the causal pass), `drafters` (prompt-lookup
drafts), `sampling` (temperature, top-k/p, confidence rules), `events` (the records every consumer
reads) and `completion` (raw-text completion with stop strings, for evaluations). The text and timing
layer on top is `nbdiff.api`.
"""
