"""A reusable `llama_batch` of one sequence (id 0) with numpy views on its arrays: token ids, or
embedding rows (`llama_batch_init(n, n_embd, 1)`, the way mtmd injects image rows), at explicit
positions, filled without per-row Python loops."""

from __future__ import annotations

import numpy as np

from eyecare_edge.llm.binding import lib


def array_view(pointer, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy array over memory llama.cpp owns (no copy; valid while the owner lives)."""
    return np.ctypeslib.as_array(pointer, shape=shape)


class Batch:
    """A `llama_batch` of one sequence with numpy views on its arrays (no per-row Python loops)."""

    def __init__(self, capacity: int, n_embd: int) -> None:
        self.capacity = capacity
        self.n_embd = n_embd
        self.batch = lib.llama_batch_init(capacity, n_embd, 1)
        self.pos = array_view(self.batch.pos, (capacity,))
        self.logits = array_view(self.batch.logits, (capacity,))
        array_view(self.batch.n_seq_id, (capacity,))[:] = 1
        for i in range(capacity):
            self.batch.seq_id[i][0] = 0
        if n_embd:
            self.embd = array_view(self.batch.embd, (capacity, n_embd))
            self.token = None
        else:
            self.embd = None
            self.token = array_view(self.batch.token, (capacity,))

    def prepare(self, n: int, start_pos: int, want_logits: bool) -> None:
        self.batch.n_tokens = n
        self.pos[:n] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self.logits[:n] = 0
        if want_logits:
            self.logits[n - 1] = 1

    def free(self) -> None:
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
            self.pos = self.logits = self.embd = self.token = None
