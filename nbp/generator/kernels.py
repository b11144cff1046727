"""The compiled passes of the CPU draw and the greedy head's integer screen (``kernels.c`` beside this file), called
through ctypes.

``pip install`` builds ``kernels.c`` into the extension ``nbp.generator._kernels`` (``setup.py``; the build is
optional, so an install without a C compiler still works). Where it is built, :mod:`nbp.generator.sampling` uses it
for its passes over a block of logits: the weights ``exp(x - max)`` with their chunk sums and the counts and masses
above the first thresholds, in one pass, and the counts and masses above later thresholds. Elsewhere, with
``NBP_KERNELS=0`` in the environment, or inside :func:`torch_ops`, torch ops do the same. Both give exactly the
filter's draw; their weights differ in the last bits, so a seeded draw can differ between the two. The compiled
passes give the same bits on every CPU and at every vector width (``kernels.c`` says how).

:func:`screen` is the integer matmul behind the greedy head's screen (:class:`nbp.generator.model.HeadScreen`):
exact, so its result is the same everywhere; without the extension the screen is not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os

import torch

ENV = "NBP_KERNELS"  # "0": the torch ops even where the extension is built
EXTENSION = "nbp.generator._kernels"
MAX_THRESHOLDS = 8  # MAXQ of kernels.c
LANES, RUN = 16, 2048  # a chunk of the chunk sums is a multiple of LANES that divides RUN (kernels.c)
_OFF = [False]


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The built extension, loaded as a plain shared library (None: not built)."""
    try:
        spec = importlib.util.find_spec(EXTENSION)
    except ImportError:
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:  # built, but a library it needs (the OpenMP runtime) is missing here
        return None
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.nbp_weights.argtypes = [P, L, P, P, L, P, L, P, I, P, P, L, L]
    lib.nbp_count_mass.argtypes = [P, L, P, L, P, I, P, P, L, L]
    lib.nbp_width.argtypes = [I]
    lib.nbp_screen.argtypes = [P, P, P, L, L, L, I]
    lib.nbp_threaded.argtypes = []
    lib.nbp_gemv.argtypes = [P, L, P, P, P, L, L, I]
    lib.nbp_gemv.restype = I
    lib.nbp_threaded.restype = I
    lib.nbp_weights.restype = lib.nbp_count_mass.restype = lib.nbp_width.restype = lib.nbp_screen.restype = I
    return lib


def built() -> bool:
    """Is the extension built (whatever the switches say)?"""
    return _lib() is not None


def compiled() -> bool:
    """Is the extension built and not switched off (``NBP_KERNELS=0``)? The linears' and the greedy head's kernels
    follow this; the draw's passes follow :func:`enabled`."""
    return os.environ.get(ENV, "1") != "0" and built()


def enabled() -> bool:
    """Does the draw use the compiled passes: built, and not switched off (``NBP_KERNELS=0``, :func:`torch_ops`)?"""
    return not _OFF[0] and os.environ.get(ENV, "1") != "0" and built()


@contextlib.contextmanager
def torch_ops():
    """Inside: the draw runs its passes with torch ops, as where the extension is not built."""
    before = _OFF[0]
    _OFF[0] = True
    try:
        yield
    finally:
        _OFF[0] = before


def width(want: int = 0) -> int:
    """Set the vector width of the passes and return it: the widest this CPU runs (``want=0``: 16 floats with
    AVX-512, 8 with AVX2, else 4), or the widest of at most ``want`` floats. Every width gives the same bits; the
    draw uses the widest (the tests compare them)."""
    return _lib().nbp_width(int(want))


def fits(*ts: torch.Tensor) -> bool:
    """Can the kernels take these [n, V] tensors: float32 on the CPU, each row contiguous?"""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1
               and t.stride(0) >= t.shape[1] for t in ts)


def usable(*ts: torch.Tensor, q: int = 0) -> bool:
    """Do the compiled passes take this call: :func:`enabled`, the tensors :func:`fits`, and at most
    :data:`MAX_THRESHOLDS` thresholds a row (``q``)?"""
    return enabled() and fits(*ts) and q <= MAX_THRESHOLDS


def _thresholds(t: torch.Tensor | None, n: int) -> torch.Tensor:
    t = torch.empty(n, 0) if t is None else t.to(torch.float32).contiguous()
    if t.dim() != 2 or t.shape[0] != n or t.shape[1] > MAX_THRESHOLDS:
        raise ValueError(f"thresholds must be [{n}, q] with q <= {MAX_THRESHOLDS}, not {list(t.shape)}")
    return t


def _check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"nbp.generator.kernels: {what} refused its arguments")


def weights(x: torch.Tensor, m: torch.Tensor, w: torch.Tensor, sums: torch.Tensor | None = None, chunk: int = 0,
            t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In one pass over x [n, V] (rows contiguous, :func:`fits`): w [n, V] = exp(x - m [n, 1]) (0 where that is
    below the smallest normal float; m at least each row's largest logit, so that x - m <= 0); ``sums``
    [n, V // chunk]: the sum of w over each whole chunk of ``chunk`` ids (a multiple of 16 that divides 2048); ->
    (#(x > t), the sum of w where x > t) [n, q] each (float32), for the q <= 8 thresholds per row t [n, q] (None:
    q = 0)."""
    n, V = x.shape
    m = m.to(torch.float32).reshape(n).contiguous()
    t = _thresholds(t, n)
    q = t.shape[1]
    if sums is not None and not (chunk % LANES == 0 and chunk and RUN % chunk == 0 and sums.is_contiguous()
                                 and sums.shape == (n, V // chunk)):
        raise ValueError(f"chunk sums need a contiguous [{n}, V // chunk] tensor and a chunk that is a multiple of "
                         f"{LANES} dividing {RUN}")
    c, z = torch.empty(n, q), torch.empty(n, q)
    _check(_lib().nbp_weights(x.data_ptr(), x.stride(0), m.data_ptr(), w.data_ptr(), w.stride(0),
                              None if sums is None else sums.data_ptr(), chunk, t.data_ptr(), q, c.data_ptr(),
                              z.data_ptr(), n, V), "nbp_weights")
    return c, z


def count_mass(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(#(x > t), the sum of w where x > t) [n, q] each (float32), for 1 <= q <= 8 thresholds per row t [n, q];
    x and w [n, V], rows contiguous (:func:`fits`)."""
    n, V = x.shape
    t = _thresholds(t, n)
    q = t.shape[1]
    c, z = torch.empty(n, q), torch.empty(n, q)
    _check(_lib().nbp_count_mass(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), t.data_ptr(), q, c.data_ptr(),
                                 z.data_ptr(), n, V), "nbp_count_mass")
    return c, z


def screen_limit(K: int) -> int:
    """The largest |x| :func:`screen` takes for inputs of K columns: every dot product of int8 weights (at most 127
    in size) with such int16 inputs stays exact in int32."""
    return min(32767, (2**31 - 1) // (127 * K))


def threaded() -> bool:
    """Was the extension built with OpenMP (:func:`screen` splits its rows over threads)?"""
    return bool(_lib().nbp_threaded())


def screen(q: torch.Tensor, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """x [M, K] int16 . q [N, K]^T int8 -> [M, N] int32, exact (|q| <= 127, |x| <= :func:`screen_limit` (K)), the
    rows of q split over ``threads`` threads of torch's OpenMP pool (where :func:`threaded`)."""
    N, K = q.shape
    M = x.shape[0]
    if not (q.dtype == torch.int8 and x.dtype == torch.int16 and q.is_contiguous() and x.is_contiguous()
            and x.dim() == 2 and x.shape[1] == K and q.device.type == x.device.type == "cpu"):
        raise ValueError(f"screen takes contiguous CPU int8 [N, K] and int16 [M, K], not {q.dtype} {list(q.shape)} "
                         f"and {x.dtype} {list(x.shape)}")
    out = torch.empty(M, N, dtype=torch.int32)
    _check(_lib().nbp_screen(q.data_ptr(), x.data_ptr(), out.data_ptr(), N, K, M,
                             max(1, int(threads))), "nbp_screen")
    return out


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, threads: int = 1) -> torch.Tensor:
    """x [M, K] . w [N, K]^T (+ b [N]) -> [M, N], float32 on the CPU, for a few rows M: each weight row read once
    for all of them, the rows of w split over ``threads`` threads of torch's OpenMP pool (where :func:`threaded`).
    Every output sums its products in 16 lanes (k mod 16) added in one fixed order: the same bits at every vector
    width and thread count, but not the bits of torch's matmul."""
    M, K = x.shape
    N = w.shape[0]
    ok = (x.dtype == w.dtype == torch.float32 and x.device.type == w.device.type == "cpu" and x.is_contiguous()
          and w.is_contiguous() and w.dim() == 2 and w.shape[1] == K
          and (b is None or (b.dtype == torch.float32 and b.is_contiguous() and b.shape == (N,))))
    if not ok:
        raise ValueError(f"gemv takes contiguous CPU float32 x [M, K], w [N, K] and b [N], not {list(x.shape)} "
                         f"{x.dtype}, {list(w.shape)} {w.dtype}, {None if b is None else list(b.shape)}")
    y = torch.empty(M, N)
    _check(_lib().nbp_gemv(x.data_ptr(), M, w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), N, K,
                           max(1, int(threads))), "nbp_gemv")
    return y
