"""Counter-based randomness: stateless, O(1) per element, identical on every rank.

Everything random in the data pipeline that has to be *positioned* rather than *replayed* lives
here: the shuffle of an epoch (a keyed pseudo-random permutation, evaluated at any stream position
without materialising the permutation) and per-document coin flips (the validation split).
Numbers come from hashing (key, counter) with the splitmix64 finaliser, a bijection on 64-bit
integers, so the value at position i never depends on how many values were drawn before it.
"""

from __future__ import annotations

import numpy as np

_U64 = np.uint64
# Domain tags keep the streams of different users of the same seed apart.
DOMAIN_SHUFFLE = 0x53485546  # "SHUF"
DOMAIN_VALIDATION = 0x56414C49  # "VALI"
DOMAIN_MASKING = 0x4D41534B  # "MASK"
DOMAIN_MIXTURE = 0x4D495854  # "MIXT"

_FEISTEL_ROUNDS = 6


def derive_key(*parts: int, count: int = 1) -> np.ndarray:
    """`count` 64-bit keys derived from non-negative integers (numpy's SeedSequence mixing)."""
    if any(int(p) < 0 for p in parts):
        raise ValueError(f"seed material must be non-negative integers, got {parts}")
    return np.random.SeedSequence([int(p) for p in parts]).generate_state(count, dtype=np.uint64)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-avalanching hash of uint64 values (vectorised)."""
    x = np.asarray(x, dtype=_U64)
    with np.errstate(over="ignore"):  # modular arithmetic is the point
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def hash_uniform(key: np.uint64 | int, counters: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per counter, a pure function of (key, counter)."""
    c = np.asarray(counters, dtype=_U64)
    with np.errstate(over="ignore"):
        h = mix64(mix64(c ^ _U64(key)) + _U64(0x9E3779B97F4A7C15))
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


class FeistelPermutation:
    """A keyed pseudo-random permutation of range(n), evaluated element-wise in O(1).

    A balanced Feistel network permutes the smallest even-bit power-of-two domain >= n; values
    that land outside range(n) are fed through again ("cycle walking"), which restricts the
    bijection to range(n). The domain is < 4n, so on average fewer than 4 passes are needed.
    No O(n) table is ever built, so positioning at sample 10^10 costs the same as at sample 0.
    """

    def __init__(self, n: int, key_parts: tuple[int, ...]):
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = int(n)
        half_bits = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._half_bits = _U64(half_bits)
        self._half_mask = _U64((1 << half_bits) - 1)
        self._round_keys = derive_key(*key_parts, count=_FEISTEL_ROUNDS)

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        left = x >> self._half_bits
        right = x & self._half_mask
        for k in self._round_keys:
            f = mix64(right ^ k) & self._half_mask
            left, right = right, left ^ f
        return (left << self._half_bits) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The permuted value of each position (positions must lie in range(n))."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        if self.n == 1:
            return np.zeros_like(pos)
        x = self._rounds(pos.astype(_U64))
        outside = x >= _U64(self.n)
        while outside.any():
            x[outside] = self._rounds(x[outside])
            outside = x >= _U64(self.n)
        return x.astype(np.int64)
