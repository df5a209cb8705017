"""The pretraining objective: masked LM (dynamic masking) + reply-order prediction on a batch of pairs.

Masks are drawn from a generator seeded by (seed, epoch, global batch, micro-batch): a pure function of
where training stands, so a resumed run, on any number of workers, draws the masks the uninterrupted one
drew.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from twilbert.config import MaskedLMConfig
from twilbert.data.batch import PairBatch
from twilbert.data.masking import mask_tokens
from twilbert.data.special import IGNORE_INDEX, MASK_ID, N_SPECIAL
from twilbert.train.losses import linear_mlm_loss, rop_loss
from twilbert.train.rng_state import step_seed

__all__ = ["PretrainObjective", "masked_positions", "step_seed"]


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) of the positions with an MLM label in host ``labels`` (B, T): computed where the
    masks are drawn, so that neither the count nor the selection waits for the device."""
    return (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)


class PretrainObjective:
    """MLM + ROP loss of one batch; masks drawn from a generator seeded by where training stands.

    As the loop's ``MicroLoss`` (``prepare``, ``micro_loss``): micro-batch k of global batch s draws its
    masks from (seed, epoch, s, k), and its summed MLM and ROP losses are divided by the masked tokens
    and the pairs of the whole global batch, so every masked token and every pair weighs the same
    whichever micro-batch, and worker, it landed in. Called directly (``objective(model, batch)``),
    the losses are the batch's own means under masks of (seed, 0, calls so far).
    """

    normalizers = 2  # masked tokens, pairs

    def __init__(self, masked_lm: MaskedLMConfig, seed: int, vocab_size: int, device: torch.device,
                 mask_id: int = MASK_ID, n_special: int = N_SPECIAL):
        self.masked_lm, self.seed, self.vocab_size, self.device = masked_lm, seed, vocab_size, device
        # twilbert's fixed ids, or a Hugging Face checkpoint's mask id and its leading special ids
        self.mask_id, self.n_special = mask_id, n_special
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

        ``normalizers`` (2,): the divisors of the summed MLM and ROP losses (the global batch's counts);
        default, this batch's own counts (means). The counts are device tensors or host numbers, never read here:
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

    def prepare(self, batch: PairBatch, keys: tuple[int, ...]):
        """The micro-batch with its masks (host) and its denominators: masked tokens, pairs."""
        masked, labels = self.mask(batch, *keys)
        positions = masked_positions(labels)
        return (batch, masked, labels, positions), (float(positions.numel()), float(batch.labels.numel()))

    def micro_loss(self, model: torch.nn.Module, prepared, totals: torch.Tensor):
        batch, masked, labels, positions = prepared
        return self.outputs(model, batch, masked, labels, totals.float(), positions)

    def __call__(self, model: torch.nn.Module, batch: PairBatch):
        keys = (0, self._calls)
        self._calls += 1
        masked, labels = self.mask(batch, *keys)
        return self.outputs(model, batch, masked, labels)
