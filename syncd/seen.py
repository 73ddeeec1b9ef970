"""Which keys a reconcile pass read, in memory that does not grow with the table.

A reconcile finds the keys the model no longer has: those with a digest that the pass
did not read. Asking the source about every stored key (an `IN (...)` lookup per 500)
costs more than the pass itself; remembering every key read costs memory in proportion
to the table. `SeenKeys` is a Bloom filter: a bitmap of 128 bits per stored key (16 MB
for 1M keys, at most 32 MB), two bits set per key read, placed by the key's hash
times a multiplier drawn for each pass:
- a key the pass read is never reported as unseen;
- a key it did not read is reported but for a chance of (1 - e^(-2/128))^2, about 1 in
  4,000 up to 2M stored keys (1 in 190 at 10M, where the bitmap stops growing). One that
  is missed is found by a later pass, where its bits lie elsewhere. (A third bit would
  make that 1 in 80,000 and cost a 1M-row reconcile a quarter of its speed.)
A removal is recorded only for an unseen key that the source then confirms absent (a row
may have arrived since its range was read): the bitmap narrows the question to those.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

__all__ = ["SeenKeys"]

BITS_PER_KEY = 128
MIN_BITS = 1 << 16
MAX_BITS = 1 << 28  # 32 MB
_BITS_64 = (1 << 64) - 1


class SeenKeys:
    def __init__(self, expected: int) -> None:
        bits = MIN_BITS
        while bits < expected * BITS_PER_KEY and bits < MAX_BITS:
            bits <<= 1
        self._shift = 64 - (bits.bit_length() - 1)  # the first position: the top bits of the mixed hash
        self._mask = bits - 1
        self._bits = bytearray(bits // 8)
        self._salt = random.getrandbits(64) | 1  # a new odd multiplier every pass: other positions for every key

    # Two positions from the key's hash times the pass's multiplier: the product's top bits
    # and its bits 8-35 (disjoint from the top even at the largest size; the lowest bits of
    # a product depend only on the lowest of the hash). Written out in both loops, which
    # run once per key of the table.

    def add(self, keys: Iterable[str]) -> None:
        bits, mask, shift, salt = self._bits, self._mask, self._shift, self._salt
        for key in keys:
            value = (hash(key) * salt) & _BITS_64
            first, second = value >> shift, (value >> 8) & mask
            bits[first >> 3] |= 1 << (first & 7)
            bits[second >> 3] |= 1 << (second & 7)

    def unseen(self, keys: Sequence[str]) -> list[str]:
        """The keys among `keys` that the pass surely did not read."""
        bits, mask, shift, salt = self._bits, self._mask, self._shift, self._salt
        out = []
        for key in keys:
            value = (hash(key) * salt) & _BITS_64
            first, second = value >> shift, (value >> 8) & mask
            if not (bits[first >> 3] & (1 << (first & 7)) and bits[second >> 3] & (1 << (second & 7))):
                out.append(key)
        return out
