"""The compiled kernels of CPU sampling (nbp/generator/kernels.c through nbp.generator.kernels): the draw's passes
(known answers against float64 references, exact counts, the fused pass against the separate one), the few-row GEMV
(its documented summation order, float64 references, every thread count) and the greedy head's integer screen
(exact integer products up to the input limit); refused arguments; the same bits at every vector width, from every
build, with OpenMP or without."""

import ctypes
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

from nbp.generator import kernels

pytestmark = pytest.mark.skipif(not kernels.built(), reason="nbp.generator._kernels is not built (no C compiler)")
NEG = float("-inf")
SRC = os.path.join(os.path.dirname(kernels.__file__), "kernels.c")


def _logits(n=5, V=5000, seed=0):
    """Logits with what the draw meets: a wide range, ties, -inf (masked ids), and ids far below the maximum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(n, 5), V, generator=g) * 4
    x[0, ::7] = NEG
    x[1, :100] = x[1, 100]  # ties
    x[2, 3] = x[2].max() - 87.0  # just above the cut to 0
    x[2, 4] = x[2].max() - 87.6  # just below it
    x[3] = torch.round(x[3])  # ties everywhere
    x[4, 11] = 1e4  # one huge logit: everything else underflows
    return x[:n].contiguous()


def test_weights_are_exp_within_a_few_ulp_and_zero_below_the_smallest_normal():
    x = _logits()
    m = x.amax(-1, keepdim=True)
    w = torch.empty_like(x)
    kernels.weights(x, m, w)
    d = (x - m).double()  # the float difference, as torch's exp(x - m) also takes it
    exact = torch.exp(d)
    normal = d > -87.3
    rel = ((w.double() - exact).abs() / exact)[normal]
    assert float(rel.max()) < 4e-7, float(rel.max())  # float32 ulp: 6e-8 to 1.2e-7
    assert bool((w[~normal] == 0).all())
    assert float(w[2, 3]) > 0 and float(w[2, 4]) == 0
    assert bool((w[0, ::7] == 0).all())
    assert torch.equal(w.amax(-1), torch.ones(x.shape[0]))  # exp(0) is exactly 1


@pytest.mark.parametrize("V", [4096, 5000, 1021])
def test_chunk_sums_and_counts_match_float64_references(V):
    x = _logits(V=V, seed=V)
    n = x.shape[0]
    m = x.amax(-1, keepdim=True)
    chunk = 256
    w, sums = torch.empty_like(x), torch.empty(n, V // chunk)
    t = torch.stack([x[:, 5], x[:, 100], m[:, 0], torch.full_like(m[:, 0], NEG), torch.full_like(m[:, 0], -3.0e38),
                     torch.full_like(m[:, 0], math.inf), x.median(-1).values], 1)  # [n, 7] ties, max, +-inf, floor
    c, z = kernels.weights(x, m, w, sums, chunk, t)
    wd = w.double()
    ref_sums = wd[:, : V // chunk * chunk].view(n, -1, chunk).sum(-1)
    assert torch.allclose(sums.double(), ref_sums, rtol=1e-6, atol=0)
    above = x[:, None] > t[..., None]  # [n, 7, V]
    assert torch.equal(c, above.sum(-1).float())  # exact counts, strict comparison at ties
    ref_z = (above * wd[:, None]).sum(-1)
    assert torch.allclose(z.double(), ref_z, rtol=1e-6, atol=1e-30)
    c2, z2 = kernels.count_mass(x, w, t)  # the separate pass: the same bits
    assert torch.equal(c, c2) and torch.equal(z, z2)


def test_rows_with_a_stride_and_a_scratch_of_two_rows():
    """The draw's layout: weights written into the second row of an [n, 2, V] scratch, logits a column slice."""
    big = _logits(V=3000)
    x = big[:, 100:2148]  # rows of 2048 with a stride of 3000
    n, V = x.shape
    m = x.amax(-1, keepdim=True)
    w2 = torch.full((n, 2, V), 7.0)
    t = x[:, :2].clone()
    c, z = kernels.weights(x, m, w2[:, 1], None, 0, t)
    xc = x.contiguous()
    w = torch.empty_like(xc)
    c2, z2 = kernels.weights(xc, m, w, None, 0, t)
    assert torch.equal(w2[:, 1], w) and torch.equal(c, c2) and torch.equal(z, z2)
    assert bool((w2[:, 0] == 7).all())  # the other row is untouched


def test_refused_arguments_say_which():
    x = _logits(n=2, V=512)
    m = x.amax(-1, keepdim=True)
    w = torch.empty_like(x)
    with pytest.raises(ValueError, match="q <= 8"):
        kernels.count_mass(x, w, torch.zeros(2, 9))
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.weights(x, m, w, torch.empty(2, 512 // 100), 100)
    assert not kernels.fits(x.double()) and not kernels.fits(x.t()) and kernels.fits(x)


def test_switches_turn_the_compiled_passes_off(monkeypatch):
    assert kernels.enabled()
    with kernels.torch_ops():
        assert not kernels.enabled()
    assert kernels.enabled()
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.enabled()


def test_the_extension_is_built_where_ci_installs_the_package():
    """CI installs with a C compiler: a build that silently fell back to the torch ops would fail here (the
    module's skip would hide it everywhere else, so this test looks for itself)."""
    if not os.environ.get("CI"):
        pytest.skip("only CI promises a compiler")
    assert kernels.built()


def _build(flags: list[str], out: str) -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc")
    inc = sysconfig.get_paths()["include"]
    res = subprocess.run([cc, *flags, "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi", "-shared", "-fPIC",
                          f"-I{inc}", "-o", out, SRC], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(out)
    P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.nbp_weights.argtypes = [P, L, P, P, L, P, L, P, I, P, P, L, L]
    lib.nbp_width.argtypes = [I]
    lib.nbp_gemv.argtypes = [P, L, P, P, P, L, L, I]
    lib.nbp_screen.argtypes = [P, P, P, L, L, L, I]
    return lib


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and f" {flag}" in line for line in f)
    except OSError:
        return False


def _widest() -> int:
    """The widest vector (floats) of this CPU that the passes have a version for, from /proc/cpuinfo."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return 4
    return 16 if _cpu_has("avx512f") else 8 if _cpu_has("avx2") else 4


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's flags from /proc/cpuinfo")
def test_the_passes_run_at_the_widest_vector_this_cpu_has():
    """The dispatch picks the version for the CPU's own vector width (a version compiled for a wider vector than
    the CPU has would not run; a narrower one is slower), and a narrower width can be asked for."""
    try:
        assert kernels.width() == _widest()
        assert kernels.width(4) == 4
        assert kernels.width(8) == min(8, _widest())
    finally:
        kernels.width()


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")) or not os.path.exists("/proc/cpuinfo"),
                    reason="needs a C compiler on Linux")
def test_every_vector_width_and_build_gives_the_same_bits(tmp_path):
    """kernels.c at every vector width this CPU runs (4 floats: SSE2 or NEON, 8: AVX2, 16: AVX-512), in builds
    vectorised (-O3) or not (-O0), for the whole file's baseline or for AVX2 (-mavx2), with OpenMP or without, and
    without the x86 dispatch (the portable version alone): the weights, chunk sums, counts and masses, the GEMV's
    outputs and the screen's integers are the same bits, and the same as the installed build's."""
    x = _logits(n=4, V=5000, seed=3)
    n, V = x.shape
    m = x.amax(-1, keepdim=True).contiguous()
    t = torch.stack([x[:, 9], x.median(-1).values, m[:, 0] - 2], 1).contiguous()

    g = torch.Generator().manual_seed(5)
    gx, gw, gb = torch.randn(2, 200, generator=g), torch.randn(300, 200, generator=g), torch.randn(300, generator=g)
    sq = torch.randint(-127, 128, (300, 200), dtype=torch.int8, generator=g)
    lim = kernels.screen_limit(200)
    sx = torch.randint(-lim, lim + 1, (2, 200), dtype=torch.int16, generator=g)

    def run(lib):
        w, sums, c, z = torch.empty(n, V), torch.empty(n, V // 256), torch.empty(n, 3), torch.empty(n, 3)
        assert lib.nbp_weights(x.data_ptr(), V, m.data_ptr(), w.data_ptr(), V, sums.data_ptr(), 256, t.data_ptr(), 3,
                               c.data_ptr(), z.data_ptr(), n, V) == 0
        y, acc = torch.empty(2, 300), torch.empty(2, 300, dtype=torch.int32)
        assert lib.nbp_gemv(gx.data_ptr(), 2, gw.data_ptr(), gb.data_ptr(), y.data_ptr(), 300, 200, 2) == 0
        assert lib.nbp_screen(sq.data_ptr(), sx.data_ptr(), acc.data_ptr(), 300, 200, 2, 2) == 0
        return [a.numpy().view(np.uint32).copy() for a in (w, sums, c, z, y, acc)]

    builds = {"-O0": ["-O0"], "-O3": ["-O3"], "-O3 -DNBP_NO_DISPATCH": ["-O3", "-DNBP_NO_DISPATCH"],
              "-O3 -fopenmp": ["-O3", "-fopenmp"]}
    if _cpu_has("avx2"):
        builds["-O3 -mavx2"] = ["-O3", "-mavx2"]
    widths = [wd for wd in (4, 8, 16) if wd <= _widest()]
    got = {}
    for i, (k, f) in enumerate(builds.items()):
        lib = _build(f, str(tmp_path / f"k{i}.so"))
        for wd in widths:
            if lib.nbp_width(wd) == wd:  # the build without dispatch has width 4 alone
                got[f"{k}, width {wd}"] = run(lib)
    assert len(got) == (len(builds) - 1) * len(widths) + 1  # every width in every build, width 4 alone without dispatch
    w, sums = torch.empty(n, V), torch.empty(n, V // 256)
    c, z = kernels.weights(x, m, w, sums, 256, t)
    y, acc = kernels.gemv(gx, gw, gb, threads=3), kernels.screen(sq, sx, threads=3)
    got["installed"] = [a.numpy().view(np.uint32).copy() for a in (w, sums, c, z, y, acc)]
    assert torch.equal(acc.long(), sx.long() @ sq.long().T)  # the screen: exact
    first = next(iter(got.values()))
    for k, v in got.items():
        for name, a, b in zip(("weights", "chunk sums", "counts", "masses", "gemv", "screen"), v, first):
            assert np.array_equal(a, b), f"{k}: {name} differ from {next(iter(got))}"


# ---- the few-row GEMV and the greedy head's screen ---------------------------------------------------------------


def _gemv_in_order(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The GEMV's documented order, one float32 operation at a time: 16 lanes (lane l: the products at k = l, l +
    16, ...), the lanes added in order, then the last K % 16 products, then the bias."""
    M, K = x.shape
    N = w.shape[0]
    f = np.float32
    xs, ws = x.numpy(), w.numpy()
    y = np.empty((M, N), dtype=np.float32)
    whole = K // 16 * 16
    for m in range(M):
        for n in range(N):
            lanes = [f(0)] * 16
            for k in range(0, whole, 16):
                for lane in range(16):
                    lanes[lane] = f(lanes[lane] + f(xs[m, k + lane] * ws[n, k + lane]))
            s = f(0)
            for lane in range(16):
                s = f(s + lanes[lane])
            for k in range(whole, K):
                s = f(s + f(xs[m, k] * ws[n, k]))
            y[m, n] = s if b is None else f(s + b.numpy()[n])
    return torch.from_numpy(y)


@pytest.mark.parametrize("K", [64, 75])
def test_gemv_sums_in_its_documented_order_at_every_width_and_thread_count(K):
    g = torch.Generator().manual_seed(K)
    x, w, b = torch.randn(2, K, generator=g), torch.randn(37, K, generator=g), torch.randn(37, generator=g)
    want = _gemv_in_order(x, w, b)
    try:
        for wd in (4, 8, 16):
            kernels.width(wd)
            for threads in (1, 2, 3):
                assert torch.equal(kernels.gemv(x, w, b, threads), want), (wd, threads)
        assert torch.equal(kernels.gemv(x, w, None), _gemv_in_order(x, w, None))
    finally:
        kernels.width()


def test_gemv_is_within_float32_rounding_of_float64():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 512, generator=g), torch.randn(3000, 512, generator=g), torch.randn(3000, generator=g)
    ref = x.double() @ w.double().T + b.double()
    # |error| <= gamma_(K+1) sum|x w| + u |b| (any summation order), gamma_n = n u / (1 - n u), u = 2^-24
    u = 2.0**-24
    gamma = 513 * u / (1 - 513 * u)
    bound = gamma * (x.double().abs() @ w.double().abs().T) + u * b.double().abs()
    err = (kernels.gemv(x, w, b, threads=2).double() - ref).abs()
    assert (err <= bound).all()
    assert err.max() > 0  # float32 sums: not the float64 ones


def test_screen_is_the_exact_integer_product_at_the_input_limit():
    """The largest inputs the screen takes give the largest sums: at K = 1536 (the `base` width), 1536 * 127 * 11008
    is within 2^31 of zero, and the int32 sums must not wrap."""
    for K in (64, 512, 1536):
        lim = kernels.screen_limit(K)
        assert K * 127 * lim < 2**31 <= K * 127 * (lim + 1) or lim == 32767
        q = torch.full((5, K), 127, dtype=torch.int8)
        q[1] = -127
        q[2, ::2] = -127
        x = torch.full((3, K), lim, dtype=torch.int16)
        x[1] = -lim
        g = torch.Generator().manual_seed(K)
        q[3:] = torch.randint(-127, 128, (2, K), dtype=torch.int8, generator=g)
        want = x.long() @ q.long().T
        try:
            for wd in (4, 8):
                kernels.width(wd)
                for threads in (1, 2):
                    assert torch.equal(kernels.screen(q, x, threads).long(), want), (K, wd, threads)
        finally:
            kernels.width()
        assert want.abs().max() == K * 127 * lim


def test_gemv_and_screen_refuse_what_they_cannot_take():
    with pytest.raises(ValueError, match="gemv takes"):
        kernels.gemv(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="gemv takes"):
        kernels.gemv(torch.randn(2, 8).double(), torch.randn(4, 8).double())
    with pytest.raises(ValueError, match="screen takes"):
        kernels.screen(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(2, 8, dtype=torch.int32))


def _wheel(tmp_path, env: dict):
    """Build a wheel of this package's sources (copied to tmp_path, no build isolation) with ``env`` added -> its
    path."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("needs setuptools in this environment (the build runs without isolation)")
    root = Path(SRC).parents[2]
    src = tmp_path / "src"
    shutil.copytree(root / "nbp", src / "nbp", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / f, src / f)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("nbp-*.whl")
    return wheel


@pytest.mark.slow
def test_a_compiler_without_openmp_still_builds_the_kernels(tmp_path):
    """setup.py asks for OpenMP first and builds without it where the compiler refuses -fopenmp: the extension is
    there, unthreaded, and gives the same GEMV bits."""
    import zipfile

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no OpenMP" >&2; exit 1; }}; done\n'
                       f'exec {cc} "$@"\n')
    wrapper.chmod(0o755)
    wheel = _wheel(tmp_path, {"CC": str(wrapper), "LDSHARED": f"{wrapper} -shared"})
    (so,) = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]
    lib_path = tmp_path / "k.so"
    lib_path.write_bytes(zipfile.ZipFile(wheel).read(so))
    lib = ctypes.CDLL(str(lib_path))
    lib.nbp_gemv.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_long, ctypes.c_long, ctypes.c_int]
    assert lib.nbp_threaded() == 0 and kernels.threaded()
    x, w = torch.randn(1, 96), torch.randn(200, 96)
    y = torch.empty(1, 200)
    assert lib.nbp_gemv(x.data_ptr(), 1, w.data_ptr(), None, y.data_ptr(), 200, 96, 2) == 0
    assert torch.equal(y, kernels.gemv(x, w, None, threads=2))


@pytest.mark.slow
def test_an_install_without_a_compiler_still_builds_and_leaves_the_torch_ops(tmp_path):
    """setup.py marks the extension optional: with a compiler that fails, the wheel still builds, with the package's
    Python files and without the extension (the draw then takes the torch ops)."""
    import zipfile

    wheel = _wheel(tmp_path, {"CC": "false", "LDSHARED": "false"})
    names = zipfile.ZipFile(wheel).namelist()
    assert "nbp/generator/kernels.py" in names and "nbp/generator/sampling.py" in names
    assert not [n for n in names if n.endswith((".so", ".pyd"))], names
