"""What identifies a checkpoint: one digest over the files that define it.

Torch-free (hashlib only), so the exporter can stamp a bundle's source and the bench can key the
reference's resumable results without loading the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from eyecare_edge.bundle import sha256_file


def checkpoint_digest(ckpt: Path) -> str:
    """sha256 over (name, sha256) of the config, weights, chat template and tokenizer files."""
    h = hashlib.sha256()
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and (
            f.suffix in (".json", ".safetensors", ".jinja") or f.name.startswith("tokenizer")
        ):
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()
