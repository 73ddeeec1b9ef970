"""Which keys a reconcile pass read, in memory that does not grow with the table.

A reconcile finds the keys the model no longer has: those with a digest that the pass
did not read. Asking the source about every stored key (an `IN (...)` lookup per 500)
costs more than the pass itself; remembering every key read costs memory in proportion
to the table. `SeenKeys` is a bitmap of salted key hashes (a Bloom filter with one
hash), sized from the number of stored keys at 128 bits each (16 MB for 1M keys, at
most 32 MB):
- a key the pass read is never reported as unseen;
- a key it did not read is reported with probability 1 - fill, at least 99% up to 2M
  keys (about 97% at 10M). One that is missed is found by a later pass: each pass
  draws a new salt, so the same key is not missed twice in a row but by chance.
The caller confirms the unseen keys with the source (a row may have arrived since its
range was read); so the bitmap only narrows the question, it never answers it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

__all__ = ["SeenKeys"]

BITS_PER_KEY = 128
MIN_BITS = 1 << 16
MAX_BITS = 1 << 28  # 32 MB


class SeenKeys:
    def __init__(self, expected: int) -> None:
        bits = MIN_BITS
        while bits < expected * BITS_PER_KEY and bits < MAX_BITS:
            bits <<= 1
        self._mask = bits - 1
        self._bits = bytearray(bits // 8)
        self._salt = random.getrandbits(64)  # a new one every pass: a key missed once is not missed again for the same reason

    def add(self, keys: Iterable[str]) -> None:
        bits, mask, salt = self._bits, self._mask, self._salt
        for key in keys:
            position = hash((salt, key)) & mask
            bits[position >> 3] |= 1 << (position & 7)

    def unseen(self, keys: Sequence[str]) -> list[str]:
        """The keys among `keys` that the pass surely did not read."""
        bits, mask, salt = self._bits, self._mask, self._salt
        out = []
        for key in keys:
            position = hash((salt, key)) & mask
            if not bits[position >> 3] & (1 << (position & 7)):
                out.append(key)
        return out
