"""The NBDiff method itself, as small pure pieces (docs/METHOD.md).

`masks` (every attention mask, training and decoding), `noising` (block-wise masking of x_t),
`losses` (the MDM and AR losses through the AR shift, the fused head + cross-entropy), `curriculum`
(block size 1 -> 32), `layout` (the one-pass `[x_t ; x_0]` training forward), `settings` (the `nbdiff`
section of config.json) and `attention` (which kernel the 2L pass runs). Used by every command:
`adapt` trains with them, `generate`/`chat` decode with the masks and settings, `convert` writes the
settings.
"""
