"""Batch samples of `EyecareDataset` into the tensors `EyecareGPTForConditionalGeneration` takes.

Text is right-padded (pad id, attention 0, label -100); tiles of all images in the batch are
concatenated on the batch axis in order of appearance, with `image_sizes` and `image_n_tiles`
per image, which is how the model finds each image's placeholder run in `input_ids`.
Bookkeeping that is not a model input (`sample_ids`, `skipped`) rides along in the batch and is
popped by the trainer before the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from eyecare_edge.training.encoding import IGNORE_INDEX

META_KEYS = ("sample_ids", "skipped")


@dataclass
class EyecareCollator:
    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        n = len(features)
        length = max(int(f["input_ids"].shape[0]) for f in features)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            k = int(f["input_ids"].shape[0])
            input_ids[i, :k] = f["input_ids"]
            attention_mask[i, :k] = 1
            labels[i, :k] = f["labels"]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }
        tiles = [f["pixel_values"] for f in features if f["pixel_values"].shape[0]]
        if tiles:
            batch["pixel_values"] = torch.cat(tiles, dim=0)
            batch["image_sizes"] = torch.cat([f["image_sizes"] for f in features], dim=0)
            batch["image_n_tiles"] = torch.cat([f["image_n_tiles"] for f in features], dim=0)
        batch["sample_ids"] = [f.get("sample_id", "") for f in features]
        batch["skipped"] = [s for f in features for s in f.get("skipped", [])]
        return batch


def pop_meta(batch: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the bookkeeping keys so only model inputs are left in `batch`."""
    return {k: batch.pop(k) for k in META_KEYS if k in batch}
