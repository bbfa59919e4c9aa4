"""Adaptation: `nbdiff adapt` and `nbdiff distill`, the training side of nbdiff.

`recipe` (`AdaptConfig`, every flag), `trainer` (`AdaptRun`: setup, train_step with one
`compute_loss`, evaluate, save, export; `adapt()`), `train_model` (load a converted folder for
training and write the result), `data` (read, tokenise, pack, split), `checkpoint` (atomic,
unpickling-free), `run_folder` (what `--out`/`--force` may touch, the lock), `evaluation` (held-out
losses per block size), `memory` (what a step needs and the savers chosen) and `distill` (the model's
own replies as training data).
"""
