"""The one JPEG decoder of the data path (libjpeg-turbo through simplejpeg), light to import.

`mtl pack` decodes every frame with it before a frame goes into a shard, the loaders decode with it, and
`mtl shards verify` checks with it: a file one of them accepts, the others accept too.
"""

from __future__ import annotations

import numpy as np
import simplejpeg


def decode_jpeg(data: bytes | memoryview) -> np.ndarray:
    """One JPEG -> uint8 RGB [h, w, 3] (grey ones too); ValueError if it does not decode."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def jpeg_problem(data: bytes | memoryview) -> str | None:
    """Why ``data`` is not a JPEG the loader can decode (the decoder's first line), or None."""
    try:
        img = decode_jpeg(data)
    except ValueError as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else "does not decode"
    return "decodes to an empty image" if img.size == 0 else None
