"""RA-CM3's loss: next-token cross-entropy on the main document plus alpha times that on retrieved documents."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ra_cm3_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_weights: torch.Tensor,
                main_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """L = L_main + alpha * L_retrieved (Yasunaga et al. 2023, Eq. 2), each a mean over its tokens.

    logits [B, T, V]; input_ids, loss_weights, main_mask [B, T]. loss_weights[t] weighs predicting ids[t]
    from ids[:t] (1 on main tokens, alpha on retrieved ones, 0 on <bos>, in-place sentinels and padding), so
    targets are shifted by one. Returns the total ("loss") and its named parts, main and retrieved.
    """
    # [B, T-1, V] predicts [B, T-1]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    w = loss_weights[:, 1:]
    main = main_mask[:, 1:] & (w > 0)
    retrieved = ~main_mask[:, 1:] & (w > 0)
    # Main tokens carry weight 1; retrieved tokens carry alpha, so the weighted mean over them is alpha * L_ret.
    l_main = (ce * w * main).sum() / main.sum().clamp(min=1)
    l_ret_weighted = (ce * w * retrieved).sum() / retrieved.sum().clamp(min=1)
    l_ret = (ce * retrieved).sum() / retrieved.sum().clamp(min=1)
    return {"loss": l_main + l_ret_weighted, "main": l_main.detach(), "retrieved": l_ret.detach()}
