"""Exercise step 5: pick a skip set for self-speculative drafting (lesson 07).

Draft & Verify drafts with the target itself, some sub-layers replaced by the identity. A skip set
is a set of (layer, part) pairs, part "attn" or "mlp". The full model with sub-layers skipped:
    logits, _ = model(x, torch.arange(T), masks.causal(T), skip=skip_set)
Its draft is accepted when its argmax agrees with the full model's. Choose which n sub-layers to
skip so that the agreement on the text x stays as high as possible. `python -m pytest -q
tests/test_exercises.py -k step5` checks that your set is among the best of all sets of size n.
Reference idea: minispec/drafters/layerskip.py (search), which also weighs time, not just agreement.
"""

import torch

from minispec import masks


@torch.no_grad()
def pick_skip(model, x, n):
    """x (1, T) token ids of held-out text; n: how many sub-layers to skip.

    Return a set of n distinct (layer, part) pairs (0 <= layer < model.config.n_layer, part in
    ("attn", "mlp")) whose skipping keeps the top-1 agreement with the full model on x high.
    """
    raise NotImplementedError
