"""Serving: many clients' requests decoded together by the block decoder (`nbdiff serve`).

`engine` (the thread that admits requests, runs one step of every batch, hands each request its
new text and drops finished rows), `packed` (block size 1: every request's columns in one cache
row, so a joining prompt rides in the running forward, in chunks), `lane` (larger blocks: the
decoder's `Decoding` with batch rows that come and go, per-row token budgets and sampling),
`rows` (merging a newly prefilled group into a lane's KV cache and dropping rows from it),
`prefixes` (keys/values of recent prompts and conversations, reused by requests that begin the
same way) and `protocol` (OpenAI's chat and text completion requests in, jobs out, replies and
stream chunks back, errors in OpenAI's shape). Pure torch and the standard library: the HTTP
server around it lives in `nbdiff_cli.serve`.
"""
