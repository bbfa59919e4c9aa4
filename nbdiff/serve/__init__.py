"""Serving: many clients' requests decoded together by the block decoder (`nbdiff serve`).

`engine` (the thread that admits requests at block boundaries, runs one block of every batch,
hands each request its new text and drops finished rows), `lane` (a running batch: the decoder's
`Decoding` with rows that come and go, per-row token budgets and sampling), `rows` (merging a newly
prefilled group into a batch's KV cache and dropping rows from it) and `protocol` (OpenAI's chat and
text completion requests in, jobs out, replies and stream chunks back, errors in OpenAI's shape).
Pure torch and the standard library: the HTTP server around it lives in `nbdiff_cli.serve`.
"""
