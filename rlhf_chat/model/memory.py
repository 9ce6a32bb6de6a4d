"""Memory: bounds on what the native libraries keep, and freed memory given back.

A Space runs for days, and two things below Python grew its resident memory
there while nothing in Python did (issue 42):

* **Shape caches.** oneDNN (the bf16 matrix products of the training copy)
  keeps a compiled kernel per input shape, 1024 of them by default, and
  PyTorch's ideep layer keeps its own per-shape cache beside it. Every rollout,
  reward batch and chat batch has other lengths, so both fill. On this 2-core
  CPU (AVX512-BF16), 60 token counts of a layer's six products, forward and
  backward, grew resident memory by 790 MB at the defaults, 195 MB at 128,
  102 MB at 64, in the same time (``bench/shape_caches.py``). Both variables
  are read once, at the first product, so they are set before the model loads.
* **Freed memory the allocator keeps.** glibc serves tensors below 32 MB from
  its heaps, and a long-lived small tensor (a prefix-cache entry) between freed
  key/value caches pins the pages around it: 40 decoding calls' worth of that
  pattern kept 832 MB resident for 59 MB in use, and ``malloc_trim(0)`` gave
  all but 63 MB back (same script). The model worker trims now and then.
* **Freed memory between trims** (an option, off by default). glibc's mmap
  threshold rises to the size of every large block freed, up to 32 MB, so
  after the first job most activations come from its heaps, where a freed
  block is reused only by what fits in its hole. A fixed threshold
  (``model.mmap_threshold_bytes``) gives each block above it its own mapping,
  returned to the system when freed: a PPO step's peak fell by a third, but
  every job took about 1.2x as long (page faults on fresh mappings), and a
  60-minute soak with it still grew after minute 10 (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

# oneDNN's primitive cache and PyTorch's ideep cache, each in compiled kernels
SHAPE_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def limit_shape_caches(capacity: int, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Cap the native per-shape kernel caches at ``capacity`` entries (``model.shape_cache_capacity``;
    0 leaves the libraries' defaults), unless the environment already names a value:
    an operator's setting wins. Returns the values in effect.

    Effective only before the process's first bf16 product: the libraries read
    the variables once (the model loader calls this first).
    """
    env = os.environ if environ is None else environ
    if capacity > 0:
        for name in SHAPE_CACHE_VARIABLES:
            env.setdefault(name, str(capacity))
    return {name: env[name] for name in SHAPE_CACHE_VARIABLES if name in env}


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


def _libc_function(name: str) -> Callable | None:
    """A glibc allocator function by name, or None where the C library has none (musl, macOS)."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold(threshold_bytes: int, mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Serve every allocation of ``threshold_bytes`` or more from its own mapping, given
    back when it is freed (``model.mmap_threshold_bytes``; 0 leaves glibc's sliding
    threshold). True when the allocator took the setting; False at 0 or without glibc.

    A fixed threshold also stops glibc from raising it, which is the point: the
    sliding one climbs to 32 MB after the first large free and puts every later
    tensor below that on the heaps (the module docstring).
    """
    if threshold_bytes <= 0:
        return False
    mallopt = mallopt or _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    return _libc_function("malloc_trim")


def release_freed_memory() -> bool:
    """Give the pages of every freed heap chunk back to the system (``malloc_trim(0)``);
    False where the allocator cannot (no glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class MemoryTrimmer:
    """Calls :func:`release_freed_memory` at most once per ``every_s`` seconds
    (``model.trim_memory_every_s``; 0: never), from the thread that allocates most.

    A trim walks every heap, so it runs between jobs and not after each one.
    """

    def __init__(self, every_s: float, release: Callable[[], bool] = release_freed_memory,
                 clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.release = release
        self.clock = clock
        self.last = clock()
        self.trims = 0

    def maybe_trim(self) -> bool:
        """Trim if ``every_s`` has passed since the last trim; True when it did."""
        now = self.clock()
        if self.every_s <= 0 or now - self.last < self.every_s:
            return False
        self.last = now
        try:
            done = self.release()
        except OSError:  # never let housekeeping take a job down
            log.exception("could not give freed memory back")
            return False
        self.trims += done
        return done
