"""The fast CPU inference path (packed fp32 linears, head over the sampled ids, narrow decode threads) computes
what the plain path computes: logits within float32 rounding of a float64 reference, the same greedy videos,
reproducible seeded samples; the state dict never changes; missing or failing ops fall back to F.linear."""

import copy
import pickle

import pytest
import torch

from nbp.generator import kernels
from nbp.generator import model as M
from nbp.generator import sampling as S
from nbp.generator.layout import BlockLayout, TaskLayout

TEXT = ((2, 2, 2, 1, 3394, 10977, 1207, 786), (2, 2, 2, 2, 2, 1, 3190, 708))
HAVE_MKL = hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
HAVE_DNNL = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _task(name, grid=(3, 4, 4), block=(1, 1, 4), vocab=300, **kw):
    extra = {"class": dict(num_classes=3), "hybrid": dict(text_ids=TEXT), "frame_pred": dict(context_frames=1)}
    return TaskLayout(name, BlockLayout(grid, block), vocab, **{**extra.get(name, {}), **kw})


def _model(vocab, n_embd=64, n_layer=2, n_head=4, cond_len=0, scale=0.3, seed=0):
    torch.manual_seed(seed)
    m = M.GPT(M.GPTConfig(vocab_size=vocab, n_positions=128, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          cond_len=cond_len))
    with torch.no_grad():  # larger weights than the init: peaked logits, no near-ties for greedy
        for p in m.parameters():
            p.normal_(0, scale)
    return m.eval()


def _prompt(task, batch=2):
    if task.task == "frame_pred":
        g = torch.Generator().manual_seed(3)
        return S.prompt_ids(task, context=torch.randint(0, task.video_vocab, (batch, *task.layout.grid), generator=g))
    return S.prompt_ids(task, labels=torch.arange(batch) % 3, batch=batch)


def _f64_logits(m, ids, vocab=None):
    """The same forward in float64 on a copy (plain F.linear): the reference both fp32 paths are compared to."""
    ref = copy.deepcopy(m).fast_cpu(False).double()
    with torch.no_grad():
        return ref(ids, vocab=vocab)


# ---- logits ---------------------------------------------------------------------------------------------------

# Tolerance: both fp32 paths differ from the float64 forward only by float32 rounding of length-64..256 dot
# products over O(1) activations (~1e-6 here); 2e-5 leaves room for reordered sums and stays far below the
# gaps between logits that decide a greedy pick (~1e-1 with these weights).
TOL = 2e-5


@pytest.mark.parametrize("L", [1, 2, 7, 40])  # one and two rows (the compiled GEMV), a decode block and a prefill
def test_fast_logits_match_plain_and_float64(L):
    m = _model(500)
    ids = torch.randint(0, 500, (1, L), generator=torch.Generator().manual_seed(L))
    ref = _f64_logits(m, ids)
    with torch.no_grad():
        plain = m(ids)
        m.fast_cpu()
        fast = m(ids)
        again = m(ids)  # the packs built by the first call
    assert (plain.double() - ref).abs().max() < TOL
    assert (fast.double() - ref).abs().max() < TOL
    assert torch.equal(fast, again)
    kinds = {k[0] for k, e in m.head.pack.packs.items() if e[1] is not None}
    if L <= M.GEMV_ROWS and kernels.compiled():
        want = {"gemv"}
    else:
        want = {"dnnl"} if HAVE_DNNL else ({"mkl"} if L == 1 and HAVE_MKL else set())
    assert kinds == want  # the kernel of the rule ran (where this build has it)


@pytest.mark.skipif(not HAVE_MKL, reason="this torch build has no MKL packed sgemm")
def test_one_row_linears_take_mkl_where_onednn_is_missing(monkeypatch):
    monkeypatch.setattr(M, "_HAVE_DNNL", False)
    monkeypatch.setattr(M, "GEMV_ROWS", 0)  # and the compiled GEMV
    assert (M.pack_kind(1), M.pack_kind(7)) == ("mkl", "dnnl")
    m = _model(500)
    ids = torch.randint(0, 500, (1, 1), generator=torch.Generator().manual_seed(3))
    ref = _f64_logits(m, ids)
    with torch.no_grad():
        fast = m.fast_cpu()(ids)
    assert (fast.double() - ref).abs().max() < TOL
    assert {k[0] for k, e in m.head.pack.packs.items() if e[1] is not None} == {"mkl"}
    assert {k[1] for k in m.head.pack.packs} == {1}  # laid out for exactly one row


def test_head_over_a_vocabulary_span_is_that_slice_of_the_full_head():
    m = _model(500).fast_cpu()
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        part = m(ids, vocab=(123, 456))
        one = m(ids[:1], last=1, vocab=(123, 456))  # one row: the compiled GEMV (oneDNN or MKL without it)
        with M.plain_linears():
            plain_part = m(ids, vocab=(123, 456))
    assert part.shape == (2, 9, 333) and one.shape == (1, 1, 333)
    torch.testing.assert_close(part, full[..., 123:456], rtol=0, atol=TOL)
    torch.testing.assert_close(one, full[:1, -1:, 123:456], rtol=0, atol=TOL)
    torch.testing.assert_close(plain_part, full[..., 123:456], rtol=0, atol=TOL)


def test_fused_qkv_goes_through_its_own_pack():
    m = _model(300)
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    ref = _f64_logits(m, ids)
    m.fuse_qkv().fast_cpu()
    with torch.no_grad():
        got = m(ids)
    assert (got.double() - ref).abs().max() < TOL
    assert all(b.attn.qkv_pack.packs for b in m.blocks) and not any(b.attn.query.pack.packs for b in m.blocks)


# ---- generation -----------------------------------------------------------------------------------------------

MODES = {
    "nbp": dict(name="frame_pred", block=(1, 1, 4)),
    "ntp": dict(name="frame_pred", block=(1, 1, 1)),
    "hybrid": dict(name="hybrid", block=(1, 1, 4)),
    "class_cfg": dict(name="class", block=(1, 1, 4)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_generation_is_token_identical_to_the_plain_path(mode):
    task = _task(**MODES[mode])
    m = _model(task.vocab_size, cond_len=task.cond_len)
    prompt = _prompt(task)
    kw = dict(greedy=True, cfg=1.5 if mode == "class_cfg" else None)
    threads = torch.get_num_threads()
    plain = S.generate(m, task, prompt, fast=False, **kw)
    assert not m.packs()  # fast=False attaches nothing
    fast = S.generate(m, task, prompt, **kw)
    assert m.packs() and any(p.packs for p in m.packs())  # the fast path ran
    if mode == "ntp" and kernels.compiled():
        assert m.head.screen.rows > 0  # two rows a step: the screened head picked them
    assert torch.equal(fast, plain)
    assert torch.get_num_threads() == threads  # the narrow decode threads are restored
    again = S.generate(m, task, prompt, fast=False, **kw)  # packs attached, fast=False: plain linears again
    assert torch.equal(again, plain)


def test_seeded_sampling_on_the_fast_path_is_reproducible():
    task = _task(**MODES["nbp"])
    m = _model(task.vocab_size)
    prompt = _prompt(task)
    kw = dict(top_k=100, top_p=0.9)
    a = S.generate(m, task, prompt, generator=torch.Generator().manual_seed(5), **kw)
    b = S.generate(m, task, prompt, generator=torch.Generator().manual_seed(5), **kw)
    c = S.generate(m, task, prompt, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    lo = task.video_offset
    assert ((a[:, prompt.shape[1]:] >= lo) & (a[:, prompt.shape[1]:] < lo + task.video_vocab)).all()


def test_generation_raising_midway_restores_the_thread_count(monkeypatch):
    task = _task(**MODES["nbp"])
    m = _model(task.vocab_size)
    threads = torch.get_num_threads()
    calls = []

    def boom(*a, **k):
        calls.append(torch.get_num_threads())
        if len(calls) == 2:  # the first decode step (after the prefill)
            raise RuntimeError("boom")
        return orig(*a, **k)

    orig = S.sample_logits
    monkeypatch.setattr(S, "sample_logits", boom)
    with pytest.raises(RuntimeError, match="boom"):
        S.generate(m, task, _prompt(task), top_k=5)
    assert calls == [threads, 1] and torch.get_num_threads() == threads


# ---- derived state only ---------------------------------------------------------------------------------------


def test_state_dict_is_unchanged_and_packs_are_never_saved(tmp_path):
    task = _task(**MODES["nbp"])
    m = _model(task.vocab_size)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    S.generate(m, task, _prompt(task), greedy=True)
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert sum(len(p.packs) for p in m.packs()) > 0
    clone = pickle.loads(pickle.dumps(m))  # torch.save of a whole module pickles the same way
    assert clone.packs() and all(not p.packs for p in clone.packs())
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    assert set(torch.load(tmp_path / "sd.pt")) == set(before)


def test_packs_follow_new_weights():
    """load_state_dict (in place) and a dtype move both give new logits, not the packed copies of the old ones."""
    m = _model(400, seed=0).fast_cpu()
    other = _model(400, seed=1)
    for L in (1, 6):
        ids = torch.randint(0, 400, (1, L), generator=torch.Generator().manual_seed(L))
        with torch.no_grad():
            m(ids)  # packs of the old weights
            m.load_state_dict(other.state_dict())
            torch.testing.assert_close(m(ids), other(ids), rtol=0, atol=TOL)
            m.load_state_dict(_model(400, seed=0).state_dict())
    m.double()  # a cast: packs dropped, and fp64 runs plain
    assert all(not p.packs for p in m.packs())
    ids = torch.randint(0, 400, (1, 3), generator=torch.Generator().manual_seed(0))
    bare = copy.deepcopy(m).fast_cpu(False)
    with torch.no_grad():
        assert torch.equal(m(ids), bare(ids))
    assert all(not p.packs for p in m.packs())


def test_training_and_other_dtypes_never_use_the_packs():
    m = _model(300).fast_cpu()
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(0))
    m(ids).sum().backward()  # gradient enabled: plain F.linear (the packs have no gradient)
    assert all(not p.packs for p in m.packs()) and m.head.weight.grad is not None
    with torch.no_grad():
        m.to(torch.bfloat16)(ids)
    assert all(not p.packs for p in m.packs())


# ---- fallbacks ------------------------------------------------------------------------------------------------


def test_missing_ops_fall_back_to_f_linear(monkeypatch):
    monkeypatch.setitem(M.PACKERS, "mkl", lambda w, rows: None)
    monkeypatch.setitem(M.PACKERS, "dnnl", lambda w, rows: None)
    monkeypatch.setitem(M.PACKERS, "gemv", lambda w, rows: None)
    m = _model(300)
    task = _task(**MODES["nbp"], vocab=m.config.vocab_size)
    for L in (1, 5):
        ids = torch.randint(0, 300, (1, L), generator=torch.Generator().manual_seed(L))
        with torch.no_grad():
            plain = m(ids)
            fast = m.fast_cpu()(ids)
        assert torch.equal(fast, plain)  # the very same F.linear calls
    assert all(e[1] is None for p in m.packs() for e in p.packs.values())
    assert torch.equal(S.generate(m, task, _prompt(task), greedy=True),
                       S.generate(m, task, _prompt(task), greedy=True, fast=False))


def test_packers_report_absent_ops(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert M._dnnl_packed(torch.randn(8, 4), 2) is None


def test_an_op_that_refuses_an_input_falls_back_and_stays_plain(monkeypatch):
    calls = []

    def refuse(*a):
        calls.append(a[0])
        raise RuntimeError("unsupported")

    monkeypatch.setattr(M, "_run_packed", refuse)
    m = _model(300)
    ids = torch.randint(0, 300, (1, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = m(ids)
        m.fast_cpu()
        first, second = m(ids), m(ids)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    used = sum(1 for p in m.packs() if p.packs)  # head + 6 linears per block (3 rows: the oneDNN kind)
    assert used == 1 + 6 * len(m.blocks)
    assert len(calls) == (used if HAVE_DNNL else 0)  # tried once per weight, then plain for good


def test_wide_linears_run_on_the_outer_threads(monkeypatch):
    """Inside decode_threads the small linears run on one thread and those over WIDE_MIN_BYTES (GEMV_WIDE_BYTES for the
    compiled GEMV) on the outer count."""
    seen = []
    orig = M._run_packed

    def spy(kind, x, packed, w, b):
        seen.append((w.shape[0], torch.get_num_threads()))
        return orig(kind, x, packed, w, b)

    monkeypatch.setattr(M, "_run_packed", spy)
    monkeypatch.setattr(M, "WIDE_MIN_BYTES", 300 * 64 * 4)  # the head [300, 64] is wide, the blocks are not
    monkeypatch.setattr(M, "GEMV_WIDE_BYTES", 300 * 64 * 4)  # (two rows: the compiled GEMV's rule, where built)
    monkeypatch.setattr(M, "WIDE_MIN_FLOPS", 1e30)
    m = _model(300).fast_cpu()
    outer = torch.get_num_threads()
    ids = torch.randint(0, 300, (1, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), M.decode_threads(1):
        m(ids)
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == outer
    if not (HAVE_MKL or HAVE_DNNL):
        pytest.skip("no packed kernels in this torch build")
    assert {t for n, t in seen if n == 300} == {outer} and {t for n, t in seen if n != 300} == {1}


@pytest.mark.parametrize("wide", [True, False])
def test_the_draw_of_large_logits_runs_on_the_outer_threads(monkeypatch, wide):
    """generate draws from logits of at least WIDE_DRAW entries on the caller's thread count (a pass over them pays
    for a parallel region), and from smaller ones on the decode steps' one thread."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread only: nothing to widen")
    seen = []
    orig = S.sample_logits

    def spy(logits, **kw):
        seen.append(torch.get_num_threads())
        return orig(logits, **kw)

    monkeypatch.setattr(S, "sample_logits", spy)
    monkeypatch.setattr(S, "WIDE_DRAW", 1 if wide else 1 << 40)
    outer = torch.get_num_threads()
    task = _task(**MODES["nbp"])
    S.generate(_model(task.vocab_size), task, _prompt(task), top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert len(seen) == S.count_steps(task)
    assert seen[0] == outer  # the prefill's draw: decode_threads not yet entered
    assert set(seen[1:]) == ({outer} if wide else {1})
    assert torch.get_num_threads() == outer


# ---- the greedy head's screen ---------------------------------------------------------------------------------

needs_kernels = pytest.mark.skipif(not kernels.compiled(), reason="the screen needs nbp.generator._kernels")


def _head_model(V=3000, C=64, scale=0.02, seed=0):
    torch.manual_seed(seed)
    m = M.GPT(M.GPTConfig(vocab_size=V, n_positions=16, n_layer=1, n_head=4, n_embd=C)).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, scale)
    return m.fast_cpu()


def _f64_argmax(m, h, span):
    return (h.double() @ m.head.weight[span[0]:span[1]].double().T).argmax(-1)  # the first of equal ones


@needs_kernels
@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_screened_greedy_head_is_the_float64_argmax(scale):
    """Hidden rows from tiny to large, one with an outlier column (a coarse int16 scale for that row), the whole
    vocabulary or a span of it: the screen's pick is the argmax of the float64 logits."""
    m = _head_model()
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        h = torch.randn(2, 3, 64, generator=g) * scale  # [B, n, C]: 6 rows <= SCREEN_ROWS
        h[0, 0, :3] *= 40
        span = (0, 3000) if trial % 2 else (17, 2900)
        with torch.no_grad():
            got = m.greedy_ids(h, span)
        assert got.shape == (2, 3) and torch.equal(got, _f64_argmax(m, h, span))
    screen = m.head.screen
    assert screen.rows == 20 * 6
    assert screen.rows <= screen.rescored < 0.05 * screen.rows * 3000  # a few candidates a row, not the vocabulary


@needs_kernels
def test_screen_breaks_ties_as_argmax_and_sees_below_float32_rounding():
    """Equal rows: the first index, as argmax. Two rows whose logits differ by far less than float32 rounding: the
    larger one in float64, which the fp32 logits cannot tell apart. A zero hidden state: every logit is 0, id 0."""
    m = _head_model()
    w = m.head.weight
    with torch.no_grad():
        w[2000] = w[1500]
        h = (100 * w[1500]).view(1, 1, 64)
        assert int(m.greedy_ids(h)[0, 0]) == 1500  # 1500 and 2000 tie exactly: the first
        base = w[500].clone()
        h = (100 * base).view(1, 1, 64)
        w[700] = base
        w[700, 0] = torch.nextafter(base[0], torch.tensor(float("inf")) * torch.sign(h[0, 0, 0]))
        e = h[0, 0].double() @ w[[500, 700]].double().T
        assert 0 < float(e[1] - e[0]) < 1e-6 * float(e[0])  # below fp32 resolution of the logit
        fp32 = M.linear(m.head, h)[0, 0]
        assert fp32[500] == fp32[700] and int(fp32.argmax()) == 500  # the fp32 logits tie: the first
        assert int(m.greedy_ids(h)[0, 0]) == 700 == int(_f64_argmax(m, h[0], (0, 3000))[0])
        assert int(m.greedy_ids(torch.zeros(1, 1, 64))[0, 0]) == 0


@needs_kernels
def test_screen_follows_weight_changes_and_falls_back_where_it_cannot_bound():
    m = _head_model()
    h = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = int(m.greedy_ids(h)[0, 0])
        m.head.weight[123] = 10 * h[0, 0]  # in place: the int8 copy is rebuilt
        assert int(m.greedy_ids(h)[0, 0]) == 123 != first
        rows = m.head.screen.rows
        bad = h.clone()
        bad[0, 0, 5] = float("inf")
        assert torch.equal(m.greedy_ids(bad), M.linear(m.head, bad).argmax(-1))  # not finite: the fp32 logits
        big = torch.randn(1, M.SCREEN_ROWS + 1, 64)
        assert torch.equal(m.greedy_ids(big), M.linear(m.head, big).argmax(-1))  # too many rows: not screened
        assert m.head.screen.rows == rows
        m.head.weight[7, 3] = float("nan")
        assert torch.equal(m.greedy_ids(h), M.linear(m.head, h).argmax(-1))
        with M.plain_linears():
            m.greedy_ids(h)
    assert m.head.screen.rows == rows  # none of these went through the screen
