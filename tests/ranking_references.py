"""Independent references for the tests of rankings: the removal order written out with
Python's sort, and the label-free tie key it breaks ties with."""

from __future__ import annotations

import hashlib

import numpy as np


def reference_tie_key(image_id, tie_seed=0):
    """The tie-break of the removal order, written out: keyed BLAKE2b of the file name, then of
    the whole id (8-byte digests, big-endian integers)."""

    def digest(text):
        key = int(tie_seed).to_bytes(8, "little", signed=True)
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=key).digest())

    return digest(str(image_id).split("/")[-1]), digest(str(image_id))


def reference_order(scores, ids, tie_seed=0):
    """Highest score first, equal scores by the tie key, by Python's sort."""
    return np.array(
        sorted(range(len(scores)), key=lambda i: (-scores[i], reference_tie_key(ids[i], tie_seed)))
    )
