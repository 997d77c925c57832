"""CPU training keeps freed memory in the heap, so a step's large buffers reuse mapped pages instead of a fresh
mmap each (faulted in page by page). Read back through glibc's own accounting, mallinfo2."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import torch
from mtl.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
took = keep_freed_memory() if sys.argv[1] == "tuned" else None
before = libc.mallinfo2()
x = torch.empty(30 << 18)  # 30 MiB, as a layer's gradients or a ZeRO bucket
x.fill_(1.0)
alive = libc.mallinfo2()
del x
freed = libc.mallinfo2()
mib = lambda n: n / (1 << 20)
print(took, mib(alive.hblkhd - before.hblkhd), mib(freed.fordblks))
"""


def _probe(mode: str) -> tuple[str, float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    took, mmapped, free_in_heap = out.stdout.split()
    return took, float(mmapped), float(free_in_heap)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_serves_big_buffers_from_the_heap_and_keeps_them() -> None:
    try:
        took, mmapped, free_in_heap = _probe("tuned")
    except subprocess.CalledProcessError as exc:
        if "mallinfo2" in exc.stderr:
            pytest.skip("not glibc >= 2.33")
        raise
    if took != "True":
        pytest.skip("this C library has no mallopt")
    _, default_mmapped, default_free = _probe("default")
    assert default_mmapped >= 30 and default_free < 30  # glibc's default: its own mmap, unmapped again on free
    assert mmapped < 1 and free_in_heap >= 30  # tuned: from the heap, and kept there for the next step
