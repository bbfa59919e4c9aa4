"""Trained block-diffusion drafters (issue 22, DFlash-style): a few decoder layers of the AR model's width
that fill a block in one forward from fused AR hidden states; exact mode verifies their drafts.

    config.py    DrafterConfig (shape + the AR model it belongs to), DFlash's layer rule, the fingerprint
                 and the weight probe (which recognise the AR model and its quantized copies)
    model.py     Drafter (fusion, draft layers, shared frozen AR embedding and LM head), FeatureCache
    folder.py    save_drafter / load_drafter (safetensors + config.json in DFlash's layout; a mismatched
                 pair refused), find_drafter (a model folder's drafter/ subfolder)
    decoding.py  exact mode's glue: the feature cache grown by accepted tokens, one forward per draft
    train.py     training (`nbdiff adapt MODEL --target drafter`)

Used by `nbdiff generate/chat/visualize/bench/eval --drafter DIR`, `nbdiff.generate(..., drafter=DIR)`
and `nbdiff adapt --target drafter`.
"""

from nbdiff.drafter.config import DrafterConfig, default_mask_token_id, fingerprint, target_hidden_layers
from nbdiff.drafter.folder import find_drafter, load_drafter, new_drafter, save_drafter
from nbdiff.drafter.model import Drafter, FeatureCache

__all__ = [
    "Drafter", "DrafterConfig", "FeatureCache", "default_mask_token_id", "find_drafter", "fingerprint",
    "load_drafter", "new_drafter", "save_drafter", "target_hidden_layers",
]
