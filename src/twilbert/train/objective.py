"""The pretraining objective: masked LM (dynamic masking) + reply-order prediction on a batch of pairs.

Masks are drawn from a generator seeded by (seed, epoch, step[, rank]): a pure function of where
training stands, so a resumed run draws the masks the uninterrupted one drew.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from twilbert.config import MaskedLMConfig
from twilbert.data.batch import PairBatch
from twilbert.data.masking import mask_tokens
from twilbert.data.special import IGNORE_INDEX, MASK_ID, N_SPECIAL
from twilbert.train.distributed import loss_normalizer
from twilbert.train.losses import linear_mlm_loss, rop_loss


def step_seed(seed: int, *keys: int) -> int:
    """A seed that is a pure function of (seed, epoch, step): masks replay exactly on resume."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) of the positions with an MLM label in host ``labels`` (B, T): computed where the
    masks are drawn, so that neither the count nor the selection waits for the device."""
    return (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)


class PretrainObjective:
    """MLM + ROP loss of one batch; masks drawn from a generator seeded by (seed, epoch, step).

    Under DDP (``rank`` set) the key also holds the rank, so that ranks draw different masks, and
    the losses are divided by the masked-token and pair counts summed over ranks (``loss_normalizer``).
    """

    def __init__(self, masked_lm: MaskedLMConfig, seed: int, vocab_size: int, device: torch.device,
                 rank: Optional[int] = None, position: Optional[Callable[[], tuple[int, int]]] = None,
                 mask_id: int = MASK_ID, n_special: int = N_SPECIAL):
        self.masked_lm, self.seed, self.vocab_size, self.device = masked_lm, seed, vocab_size, device
        # twilbert's fixed ids, or a Hugging Face checkpoint's mask id and its leading special ids
        self.mask_id, self.n_special = mask_id, n_special
        self.rank = rank
        # (epoch, batch of the epoch) of the batch being trained: the loop's own position (LoopState),
        # so a resumed epoch's masks continue its stream. Without one (a standalone objective), epoch 0
        # and the calls so far.
        self.position = position
        self._calls = 0

    def mask(self, batch: PairBatch, *keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(step_seed(self.seed, *keys))
        return mask_tokens(
            batch.input_ids, batch.special_mask, self.masked_lm, self.vocab_size, self.mask_id, self.n_special, generator,
            word_start=batch.word_start,
        )

    def outputs(self, model: torch.nn.Module, batch: PairBatch, masked: torch.Tensor, labels: torch.Tensor,
                normalizers: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None):
        """(loss, summable counts) of ``batch`` under the given masks (host tensors).

        ``normalizers`` (2,): the divisors of the summed MLM and ROP losses (DDP); default, this
        batch's own counts (means). The counts are device tensors or host numbers, never read here:
        the training loop reads them once per logging window, so a step never waits for the device.
        """
        positions = masked_positions(labels) if positions is None else positions
        n_masked = positions.numel()
        batch = batch.to(self.device)
        out = model(masked.to(self.device, non_blocking=True), batch.segment_ids, batch.attention_mask,
                    labels.to(self.device, non_blocking=True), padded=batch.padded,
                    mlm_positions=positions.to(self.device, non_blocking=True))
        mlm, correct = linear_mlm_loss(out.mlm_states, out.decoder_weight, out.decoder_bias, out.mlm_targets,
                                       None if normalizers is None else normalizers[0])
        loss = mlm
        divisor = n_masked if normalizers is None else normalizers[0].double()
        counts = {"mlm_correct": correct, "mlm_count": n_masked, "mlm_nll_sum": mlm.detach().double() * divisor}
        if out.rop_logits is not None:
            if normalizers is None:
                loss = loss + rop_loss(out.rop_logits, batch.labels)
            else:
                total = F.cross_entropy(out.rop_logits.float(), batch.labels, reduction="sum")
                loss = loss + total / normalizers[1].clamp_min(1.0)
            counts["rop_correct"] = (out.rop_logits.detach().argmax(-1) == batch.labels).sum()
            counts["rop_count"] = batch.labels.numel()
        return loss, counts

    def __call__(self, model: torch.nn.Module, batch: PairBatch):
        epoch, step = self.position() if self.position is not None else (0, self._calls)
        self._calls += 1
        keys = (epoch, step) if self.rank is None else (epoch, step, self.rank)
        masked, labels = self.mask(batch, *keys)
        positions = masked_positions(labels)
        normalizers = None
        if self.rank is not None:  # every masked token and every pair weighs the same on any rank
            local = torch.tensor([positions.numel(), batch.labels.numel()], dtype=torch.float32)
            normalizers = loss_normalizer(local, self.device)
        return self.outputs(model, batch, masked, labels, normalizers, positions)
