"""Cached block sampling equals one full forward pass; greedy is deterministic; step counts are the documented ones."""

import pytest
import torch

from nbp.generator import LoadedGenerator
from nbp.generator import sampling as S
from nbp.generator.layout import BlockLayout, TaskLayout
from nbp.generator.model import GPT, GPTConfig, KVCache

TEXT = ((2, 2, 2, 1, 3394, 10977, 1207, 786), (2, 2, 2, 2, 2, 1, 3190, 708), (2, 2, 2, 1, 3394, 17441, 303, 860))


def _task(name, grid=(3, 4, 4), block=(1, 1, 4), vocab=20, **kw):
    extra = {"class": dict(num_classes=3), "hybrid": dict(text_ids=TEXT), "frame_pred": dict(context_frames=1)}
    return TaskLayout(name, BlockLayout(grid, block), vocab, **{**extra.get(name, {}), **kw})


def _model(task, n_layer=2, n_embd=32, n_head=2, scale=0.5, seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=task.vocab_size, n_positions=128, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      cond_len=task.cond_len))
    with torch.no_grad():  # larger weights than the init: distinct, peaked logits
        for p in m.parameters():
            p.normal_(0, scale)
    return m.double().eval()


def _prompt(task, batch=2):
    if task.task == "frame_pred":
        g = torch.Generator().manual_seed(3)
        return S.prompt_ids(task, context=torch.randint(0, task.video_vocab, (batch, *task.layout.grid), generator=g))
    return S.prompt_ids(task, labels=torch.arange(batch) % 3, batch=batch)


def _record(model):
    calls = []

    def hook(mod, args, kwargs, out):
        calls.append((args[0].clone(), kwargs.get("start", 0), kwargs.get("uncond"), out.clone()))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


MODES = {
    "nbp_row": dict(name="class", block=(1, 1, 4)),
    "ntp": dict(name="class", block=(1, 1, 1)),
    "nbp_2x2x2": dict(name="class", grid=(2, 4, 4), block=(2, 2, 2)),
    "nbp_2x2x2_tail": dict(name="class", grid=(3, 4, 4), block=(2, 2, 2)),  # last frame in 1x2x4 blocks
    "frame_1x4x4": dict(name="frame_pred", block=(1, 4, 4)),
    "frame_row": dict(name="frame_pred", block=(1, 1, 4)),
    "uncond": dict(name="uncond", block=(1, 2, 2)),
    "hybrid": dict(name="hybrid", block=(1, 1, 4)),
}


# classifier-free guidance needs a condition to drop: only the class-conditioned modes are guided (frame prediction
# and unconditional models have no condition tokens)
GUIDED = [m for m, spec in MODES.items() if spec["name"] in ("class", "hybrid")]


@pytest.mark.parametrize("mode,cfg", [(m, None) for m in MODES] + [(m, 1.5) for m in GUIDED])
def test_cached_steps_equal_one_full_forward(mode, cfg):
    task = _task(**MODES[mode])
    assert cfg is None or task.cond_len > 0, f"{mode} has no condition to guide"
    model = _model(task)
    prompt = _prompt(task)
    calls, h = _record(model)
    out = S.generate(model, task, prompt, temperature=1.0, top_k=8, cfg=cfg, generator=torch.Generator().manual_seed(0))
    h.remove()
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert len(calls) == S.count_steps(task)

    full = S.to_model_layout(task, out)  # the final sequence in the model's layout
    fed = torch.cat([c[0][: prompt.shape[0]] for c in calls], dim=1)
    assert torch.equal(fed, full[:, : fed.shape[1]])  # what was fed is the final sequence, position by position
    rows = torch.cat([full, full]) if cfg else full
    uncond = calls[0][2]
    ref = model(rows[:, : fed.shape[1]], task.dense_mask(fed.shape[1]), uncond=uncond)  # one full forward
    lo, hi = task.video_offset, task.video_offset + task.video_vocab
    for ids, start, _, logits in calls:  # each call returns the logits of its last positions (those that predict),
        end = start + ids.shape[1]  # over the video ids only (the sampled ones)
        torch.testing.assert_close(logits, ref[:, end - logits.shape[1]:end, lo:hi], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["nbp_row", "hybrid", "frame_row"])
def test_greedy_equals_argmax_of_the_full_forward(mode):
    """Greedy output is a fixed point: every sampled group is the argmax over video ids of the full forward."""
    task = _task(**MODES[mode])
    model = _model(task)
    prompt = _prompt(task)
    out = S.generate(model, task, prompt, greedy=True)
    again = S.generate(model, task, prompt, greedy=True)
    assert torch.equal(out, again)
    full = S.to_model_layout(task, out)
    L = full.shape[1] - task.block_size  # the model input drops the last block
    logits = S.layout_logits(model, task, full[:, :L])[:, task.cond_len:]  # rows predicting the targets
    lo = task.video_offset
    pred = logits[..., lo:lo + task.video_vocab].argmax(-1) + lo
    n_pred = task.num_tokens - (task.context_len if task.task == "frame_pred" else 0)
    target = out[:, -n_pred:]
    if task.task == "frame_pred":
        pred = pred[:, task.context_len - task.block_size:]
    assert torch.equal(pred, target)


def test_hybrid_output_holds_no_middle_bos_and_only_video_ids():
    task = _task("hybrid", block=(1, 1, 4))
    out = S.generate(_model(task), task, _prompt(task), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8 + 1 + task.num_tokens)
    vid = out[:, 9:]
    assert ((vid >= task.video_offset) & (vid < task.vocab_size)).all()
    codes = S.codes_of(task, out)
    assert codes.shape == (2, 3, 4, 4) and codes.min() >= 0 and codes.max() < 20


def test_hybrid_resumes_from_a_prefix_holding_the_first_row():
    """Generation from [text][bov][v_0..v_{B-1}] (middle bos inserted internally) continues the same greedy video."""
    task = _task("hybrid", block=(1, 1, 4))
    model = _model(task)
    full = S.generate(model, task, _prompt(task), greedy=True)
    part = full[:, : 9 + 4]
    assert torch.equal(S.generate(model, task, part, greedy=True), full)
    with pytest.raises(ValueError, match="block boundary"):
        S.generate(model, task, full[:, : 9 + 6], greedy=True)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    task = _task("class")
    model = _model(task, scale=0.05)  # flat logits: two seeds must differ
    p = _prompt(task)
    a = S.generate(model, task, p, generator=torch.Generator().manual_seed(1))
    b = S.generate(model, task, p, generator=torch.Generator().manual_seed(1))
    c = S.generate(model, task, p, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_zero_is_unguided_and_cfg_changes_samples():
    task = _task("class")
    model = _model(task)
    p = _prompt(task)
    plain = S.generate(model, task, p, greedy=True)
    assert torch.equal(S.generate(model, task, p, greedy=True, cfg=0.0), plain)
    assert not torch.equal(S.generate(model, task, p, greedy=True, cfg=3.0), plain)
    with pytest.raises(ValueError, match="condition"):
        t = _task("uncond")
        S.generate(_model(t), t, _prompt(t), cfg=1.0)


def test_cache_is_allocated_once_for_the_final_length(monkeypatch):
    task = _task("hybrid", block=(1, 1, 4))
    made = []
    orig = KVCache.for_model.__func__

    def spy(cls, model, batch, max_len=None, **kw):
        made.append(max_len)
        return orig(cls, model, batch, max_len=max_len, **kw)

    monkeypatch.setattr(KVCache, "for_model", classmethod(spy))
    S.generate(_model(task), task, _prompt(task), greedy=True)
    assert made == [8 + 1 + task.num_tokens + 3]  # text, bov, video, middle bos


def test_loaded_generator_call_and_generate():
    task = _task("class")
    lg = LoadedGenerator(_model(task), task)
    p = _prompt(task)
    out = lg.generate(p, greedy=True)
    assert torch.equal(out, S.generate(lg.model, task, p, greedy=True))
    L = out.shape[1] - task.block_size
    torch.testing.assert_close(lg(out[:, :L]), lg.model(out[:, :L], task.dense_mask(L)))
    half = lg.generate(p, 16, greedy=True)  # max_new_tokens: the first row only
    assert torch.equal(half, out[:, : p.shape[1] + 16])


# ---- step counts on full-size sequences (a 1-layer, width-32 model keeps this cheap) ----------------------

FULL = [
    ("ucf_hybrid", dict(name="hybrid", grid=(5, 16, 16), block=(1, 1, 16), vocab=64000), 95),
    ("k600_nbp16", dict(name="frame_pred", grid=(5, 16, 16), block=(1, 1, 16), vocab=64000, context_frames=2), 48),
    ("k600_ntp", dict(name="frame_pred", grid=(5, 16, 16), block=(1, 1, 1), vocab=64000, context_frames=2), 768),
    ("ucf_ntp", dict(name="class", grid=(5, 16, 16), block=(1, 1, 1), vocab=64000, num_classes=101), 1280),
]


@pytest.mark.parametrize("name,spec,steps", FULL, ids=[f[0] for f in FULL])
def test_forward_passes_equal_the_documented_steps(name, spec, steps):
    task = _task(**spec)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=task.vocab_size, n_layer=1, n_head=2, n_embd=32, cond_len=task.cond_len)).eval()
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    prompt = _prompt(task, batch=1)
    out = S.generate(model, task, prompt, top_k=100, top_p=0.9, generator=torch.Generator().manual_seed(0))
    h.remove()
    assert len(calls) == steps == S.count_steps(task)
    assert out.shape[1] == prompt.shape[1] + task.num_tokens - task.context_len
    if name == "ucf_hybrid":
        assert calls[:2] == [9, 1] and calls[16] == 16 and set(calls[17:]) == {16}


# ---- the fixed-shape decode path (StaticDecoder) gives the eager path's greedy output ------------------------


@pytest.mark.parametrize("mode", ["nbp_row", "ntp", "frame_row", "hybrid", "nbp_2x2x2_tail"])
@pytest.mark.parametrize("variant", ["static", "static_fused", "bf16"])
def test_static_decoder_greedy_equals_eager(mode, variant):
    task = _task(**MODES[mode])
    model = _model(task).float()
    if variant == "bf16":
        model.prepare_inference(dtype=torch.bfloat16, fuse_qkv=False)
    prompt = _prompt(task)
    eager = S.generate(model, task, prompt, greedy=True)
    if variant == "static_fused":
        model.fuse_qkv()
    steps = []
    orig = S.StaticDecoder.__call__

    def spy(self, ids, start, last=None):
        steps.append(start)
        return orig(self, ids, start, last)

    S.StaticDecoder.__call__ = spy
    try:
        static = S.generate(model, task, prompt, greedy=True, decoder="static")
    finally:
        S.StaticDecoder.__call__ = orig
    assert torch.equal(static, eager)
    assert len(steps) >= S.count_steps(task) - (task.block_size if task.task == "hybrid" else 1)  # it was used


@pytest.mark.slow
def test_compiled_static_decoder_greedy_equals_eager_on_cpu():
    """torch.compile of the fixed-shape step (inductor's C++ backend on CPU) gives the same greedy video."""
    task = _task(**MODES["frame_row"])
    model = _model(task).float().prepare_inference()
    prompt = _prompt(task)
    eager = S.generate(model, task, prompt, greedy=True)
    assert torch.equal(S.generate(model, task, prompt, greedy=True, decoder="compile"), eager)


@pytest.mark.parametrize("mode", ["hybrid", "nbp_2x2x2_tail", "ntp", "frame_1x4x4"])
def test_step_mask_shortcut_equals_the_tensor_mask(mode):
    task = _task(**MODES[mode])
    L = task.seq_len
    bid = task.block_ids(L).tolist()
    for start in range(1, L):
        for length in range(1, min(L - start, 2 * task.block_size) + 1):
            a, b = S.step_mask(task, start, length), S.step_mask(task, start, length, bid=bid)
            assert (a is None and b is None) or torch.equal(a, b), (start, length)
