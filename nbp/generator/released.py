"""Import of the released generators (``ucf_base_nbp16_hybrid.ckpt``, ``k600_base_nbp16.ckpt``, 3B variants).

Released format (NBP.md section 3): a PyTorch-Lightning checkpoint. ``state_dict`` holds the transformer as
``transformer.X`` (our GPT's ``X``: see :func:`key_mapping`) and the frozen tokenizer as
``first_stage_model.*`` (not part of the generator: ignored by name, or handed to the tokenizer importer,
:func:`tokenizer_state`); ``hyper_parameters`` holds the training ``argparse.Namespace``.

Loading never runs pickled code: ``torch.load(weights_only=True)`` with exactly one extra allowed global,
``argparse.Namespace``; any other global (anywhere in the file) is refused with an :class:`NbpError`
naming it. Keys are mapped one by one and strictly: a missing, unexpected or mis-shaped key is an error.

Hyper-parameters read (names of the release's argparse options): ``n_layer``, ``n_head``, ``n_embd``,
``vocab_size`` (video codes), ``block_size`` (position slots), ``token_number_per_step`` (block size B, with
``semi_ar``), ``hybrid``, ``cond_token_num``, ``resolution``, ``sequence_length``, found in any form Lightning or a
re-save leaves them (:func:`hyper_parameters`). Sizes are checked against the tensor shapes; what is absent is
inferred from them where the shapes decide it: ``n_layer`` (block count), ``n_embd`` (embedding width), the
vocabulary (embedding rows), position slots. ``n_head`` is in no shape: absent, it is taken from NBP.md's
released sizes, else the import asks for it.

Task and ids: a hybrid text-conditioned model (vocabulary ``B + 32000 + V``, ``uncond_embedding`` [8, C])
becomes our ``hybrid`` task, conditioned on the LLaMA ids of ``ucf101_llama_text_ids.tsv`` (class order of
that file = UCF-101 ``classInd.txt``); a model over plain codes (vocabulary ``V``, no condition) is the K600
frame-prediction layout (``frame_pred``, 2 context latent frames). Blocks of B consecutive raster tokens are
the block shape ``(1, 1, B)`` (B <= W), ``(1, B / W, W)`` or ``(B / HW, H, W)``.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path
from typing import Any

import torch

from nbp import dag
from nbp.config import ConfigError, to_dict
from nbp.data.fetch import lock_for, obtain
from nbp.errors import NbpError
from nbp.generator import FORMAT, HISTORY_COLUMNS, LoadedGenerator, generator_from_checkpoint
from nbp.generator.layout import TEXT_IDS_FILE, TEXT_LEN, TEXT_VOCAB, BlockLayout, TaskLayout, ucf101_text_ids
from nbp.generator.model import GPT, GPTConfig
from nbp.generator.sampling import count_steps
from nbp.training import export_released

GEN_PREFIX = "transformer."
IGNORED_PREFIXES = {"first_stage_model.": "the frozen video tokenizer (import it with --tokenizer-out)"}
ALLOWED_GLOBALS = [argparse.Namespace]
TOP_KEYS = ["tok_emb.weight", "pos_emb", "ln_f.weight", "ln_f.bias", "head.weight", "uncond_embedding"]
BLOCK_KEYS = [f"{m}.{p}" for m in ("ln1", "ln2") for p in ("weight", "bias")]
BLOCK_KEYS += [f"attn.{m}.{p}" for m in ("key", "query", "value", "proj") for p in ("weight", "bias")]
BLOCK_KEYS += [f"mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
HEADS = {(24, 1536): 16, (24, 2048): 32, (32, 3072): 32}  # NBP.md presets: 700M, 1.2B, 3B
K600_CONTEXT_FRAMES = 2  # 5 frames = 2 latent frames


def key_mapping(n_layer: int) -> dict[str, str]:
    """Released key -> our GPT key, every parameter written out."""
    ours = TOP_KEYS + [f"blocks.{i}.{k}" for i in range(n_layer) for k in BLOCK_KEYS]
    return {GEN_PREFIX + k: k for k in ours}


# --------------------------------------------------------------------------------------
# reading


def load_allowlisted(path: str | Path):
    """Unpickle a torch file with ``weights_only=True`` plus ``argparse.Namespace``; any other global is refused."""
    path = Path(path)
    if not path.is_file():
        raise NbpError(f"{path}: released checkpoint not found")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every unpickling failure is a refusal the user must see
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise NbpError(f"{path}: refused to unpickle {found.group(1)}: a released checkpoint may hold only "
                           "argparse.Namespace and plain types") from None
        last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
        raise NbpError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {last})") from None


def read_released(path: str | Path) -> dict:
    """The Lightning checkpoint as plain data + tensors, unpickled through the allow-list."""
    obj = load_allowlisted(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise NbpError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return obj


def _plain(v: Any) -> Any:
    """Hyper-parameter values as JSON-like data (Namespaces become dicts; other objects cannot occur)."""
    if isinstance(v, argparse.Namespace):
        v = vars(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


# keys under which Lightning (``save_hyperparameters()`` in ``__init__(self, args)``) or a re-saved file nests the
# training options as a plain dict; a Namespace is merged in under any key
NESTED_KEYS = ("args", "hparams", "hyper_parameters")


def _flatten(hp: dict, where: str) -> dict:
    """A ``hyper_parameters`` dict with its nested option sets (Namespaces, dicts under :data:`NESTED_KEYS`)
    merged into one level; a key given twice with different values is an error naming both places."""
    out, origin = {}, {}
    for k, v in hp.items():
        k = str(k)
        if isinstance(v, argparse.Namespace) or (isinstance(v, dict) and k in NESTED_KEYS):
            items = _flatten(_plain(v), f"{where}.{k}").items()
            at = f"{where}.{k}"
        else:
            items, at = [(k, _plain(v))], where
        for kk, vv in items:
            if kk in out and out[kk] != vv:
                raise NbpError(f"{origin[kk]}.{kk} = {out[kk]!r} but {at}.{kk} = {vv!r}")
            origin.setdefault(kk, at)
            out[kk] = vv
    return out


def hyper_parameters(ckpt: dict) -> dict:
    """``hyper_parameters`` as one flat dict, whichever form it has: the argparse Namespace itself, a flat dict, or
    a dict holding the options as a Namespace or a plain dict under ``args`` (what re-saving a released file for
    ``torch.load(weights_only=True)`` gives); absent or None: ``{}`` (sizes then come from the shapes)."""
    hp = ckpt.get("hyper_parameters")
    if hp is None:
        return {}
    if isinstance(hp, argparse.Namespace):
        hp = vars(hp)
    if not isinstance(hp, dict):
        raise NbpError(f"hyper_parameters: expected an argparse.Namespace or a dict, got {type(hp).__name__}")
    return _flatten(hp, "hyper_parameters")


def split_state(state: dict, source: str) -> tuple[dict, dict[str, int]]:
    """(generator tensors ``transformer.*``, {ignored prefix: key count}); any other key is an error."""
    gen, ignored = {}, dict.fromkeys(IGNORED_PREFIXES, 0)
    for k, v in state.items():
        if k.startswith(GEN_PREFIX):
            gen[k] = v
            continue
        prefix = next((p for p in IGNORED_PREFIXES if k.startswith(p)), None)
        if prefix is None:
            raise NbpError(f"{source}: state_dict key {k!r} is neither {GEN_PREFIX}* nor one of the ignored "
                           f"{', '.join(p + '*' for p in IGNORED_PREFIXES)}")
        ignored[prefix] += 1
    return gen, ignored


def tokenizer_state(ckpt: dict) -> dict:
    """``first_stage_model.*`` as a released tokenizer state dict (``module.*``, for nbp.tokenizer.released)."""
    p = "first_stage_model."
    return {"module." + k[len(p):]: v for k, v in ckpt["state_dict"].items() if k.startswith(p)}


# --------------------------------------------------------------------------------------
# sizes and task


def _get(hp: dict, key: str, default=None):
    v = hp.get(key, default)
    return default if v is None else v


def block_shape(B: int, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """B consecutive raster tokens as a block shape of the grid."""
    T, H, W = grid
    if B <= W and W % B == 0:
        return (1, 1, B)
    if B % W == 0 and H % (B // W) == 0:
        return (1, B // W, W)
    if B % (H * W) == 0 and T % (B // (H * W)) == 0:
        return (B // (H * W), H, W)
    raise ValueError(f"{B} consecutive tokens are not a block of the grid {list(grid)}")


def released_layout(gen: dict, hp: dict, source: str, *, block: int | None = None, n_head: int | None = None,
                    context_frames: int | None = None) -> tuple[GPTConfig, TaskLayout, list[dict]]:
    """Model config, task layout and classes of a released generator (overrides > hyper-parameters > shapes)."""
    try:
        rows, C = gen[GEN_PREFIX + "tok_emb.weight"].shape
        n_pos = gen[GEN_PREFIX + "pos_emb"].shape[1]
        cond_len = gen[GEN_PREFIX + "uncond_embedding"].shape[0]
    except KeyError as e:
        raise NbpError(f"{source}: state_dict has no {e.args[0]!r}") from None
    n_layer = 1 + max((int(m.group(1)) for k in gen if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))), default=-1)
    for key, have in (("n_layer", n_layer), ("n_embd", C), ("block_size", n_pos)):
        if key in hp and hp[key] is not None and int(hp[key]) != have:
            raise NbpError(f"{source}: hyper_parameters.{key} = {hp[key]} but the weights have {have}")
    heads = n_head or _get(hp, "n_head") or HEADS.get((n_layer, C))
    if heads is None:
        raise NbpError(f"{source}: number of heads unknown: no hyper_parameters.n_head, {n_layer} layers x width {C} is "
                       f"none of the released sizes, and tensor shapes do not record it (pass --n-head)")
    frames, res = int(_get(hp, "sequence_length", 17)), int(_get(hp, "resolution", 128))
    grid = (1 + (frames - 1) // 4, res // 8, res // 8)
    hp_B = _get(hp, "token_number_per_step")
    if _get(hp, "vocab_size") is not None:
        V = int(hp["vocab_size"])
    elif cond_len == 0 and not hp.get("hybrid"):
        V = rows  # the K600 layout: one embedding row per code
    elif hp_B or block:
        V = rows - TEXT_VOCAB - int(hp_B or block)  # hybrid: B special ids + text ids + codes
    else:
        V = 64000  # hybrid with neither the vocabulary nor the block size recorded: the released FSQ's codes
    hybrid = bool(hp.get("hybrid", False)) or (cond_len == TEXT_LEN and rows > TEXT_VOCAB + V)
    if hybrid:
        B = rows - TEXT_VOCAB - V
        if cond_len != TEXT_LEN or B <= 0 or (block or B) != B:
            raise NbpError(f"{source}: hybrid model with vocabulary {rows}, {cond_len} condition rows: expected "
                           f"{TEXT_LEN} rows and B + {TEXT_VOCAB} + {V} ids")
    elif rows == V and cond_len == 0:
        hp_block = (_get(hp, "token_number_per_step") if hp.get("semi_ar", True) else 1)
        if hp_block is not None and block is not None and int(hp_block) != block:
            raise NbpError(f"{source}: the file was trained with blocks of {hp_block} tokens, not {block}")
        B = int(hp_block or block or 16)
    else:
        raise NbpError(f"{source}: vocabulary {rows} with {cond_len} condition rows is neither the UCF hybrid "
                       f"(B + {TEXT_VOCAB} + {V}, 8 rows) nor the K600 layout ({V}, 0 rows)")
    if hybrid and hp.get("token_number_per_step") not in (None, B):
        raise NbpError(f"{source}: hyper_parameters.token_number_per_step = {hp['token_number_per_step']} but the "
                       f"vocabulary implies {B} special ids")
    try:
        layout = BlockLayout(grid, block_shape(B, grid))
        if hybrid:
            text = ucf101_text_ids()
            task = TaskLayout("hybrid", layout, V, num_classes=len(text), text_ids=tuple(tuple(t) for t in text.values()))
        else:
            task = TaskLayout("frame_pred", layout, V, context_frames=context_frames or K600_CONTEXT_FRAMES)
    except ValueError as e:
        raise NbpError(f"{source}: {e}") from None
    if task.vocab_size != rows:
        raise NbpError(f"{source}: vocabulary {rows} != {task.vocab_size} of the {task.task} layout")
    if task.seq_len > n_pos:
        raise NbpError(f"{source}: {n_pos} position slots cannot hold the {task.task} sequence")
    classes = ucf101_classes() if hybrid else []
    cfg = GPTConfig(vocab_size=rows, n_positions=n_pos, n_layer=n_layer, n_head=int(heads), n_embd=C, cond_len=cond_len)
    return cfg, task, classes


def ucf101_classes() -> list[dict]:
    """The 101 UCF classes in the text-ids file's order (= classInd.txt): ``{"label", "name", "text"}``."""
    with open(TEXT_IDS_FILE, newline="") as f:
        return [{"label": i, "name": r["class"], "text": r["text"]} for i, r in enumerate(csv.DictReader(f, delimiter="\t"))]


# --------------------------------------------------------------------------------------
# conversion


def convert_state_dict(gen: dict, cfg: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Released ``transformer.*`` tensors -> our GPT state dict (strict: names and shapes)."""
    with torch.device("meta"):
        shell = GPT(cfg)
    want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    mapping = key_mapping(cfg.n_layer)
    if set(mapping.values()) != set(want):
        raise NbpError(f"key mapping does not cover the model: {sorted(set(want) ^ set(mapping.values()))[:5]}")
    missing = [k for k in mapping if k not in gen]
    unexpected = [k for k in gen if k not in mapping]
    if missing or unexpected:
        raise NbpError(f"{source}: generator keys do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    out = {}
    for rk, ok in mapping.items():
        t = gen[rk]
        if tuple(t.shape) != want[ok]:
            raise NbpError(f"{source}: {rk} has shape {list(t.shape)}, expected {list(want[ok])}")
        out[ok] = t.to(torch.float32).contiguous()
    return out


def convert_released(ckpt: dict, source: str = "released checkpoint", **overrides) -> dict:
    """A loaded Lightning checkpoint -> our ``nbp-generator`` checkpoint dict (plain data + tensors)."""
    hp = hyper_parameters(ckpt)
    gen, ignored = split_state(ckpt["state_dict"], source)
    cfg, task, classes = released_layout(gen, hp, source, **overrides)
    return {"format": FORMAT, "version": 1, "config": cfg.to_dict(), "model": convert_state_dict(gen, cfg, source),
            "task": task.describe(), "classes": classes, "tokenizer": None, "source": "released",
            "released_file": Path(source).name, "step": int(ckpt.get("global_step", 0) or 0),
            "ignored": {p: n for p, n in ignored.items()}, "hyper_parameters": hp}


def import_released_generator(path: str | Path, **overrides) -> dict:
    """Read a released ``.ckpt`` and convert it (see :func:`convert_released`)."""
    return convert_released(read_released(path), str(path), **overrides)


def load_released_generator(path: str | Path, device="cpu", **overrides) -> LoadedGenerator:
    """A released ``.ckpt`` imported on the fly, ready to sample (eval mode)."""
    return generator_from_checkpoint(import_released_generator(path, **overrides), device)


def run_import_released(cfg, name: str, paths) -> Path:
    """Stage ``train_generator`` with ``source: released``: fetch (URL) or read (path) the ``.ckpt``, convert it,
    check it against the entry (task, block), write ``generator.pt``, an empty ``history.csv`` and ``metrics.json``."""
    g = cfg.entry("train_generator", name)
    src = g.checkpoint
    if src is None:
        raise ConfigError(f"train_generator.{name}.checkpoint", "source is 'released' but no checkpoint is given")
    path, sha = obtain(src, paths.state, lock_for(cfg))
    B = g.block[0] * g.block[1] * g.block[2]
    ckpt = import_released_generator(path, block=B, context_frames=g.context_frames)
    task = ckpt["task"]
    if task["task"] != g.task or tuple(task["block"]) != tuple(g.block):
        raise ConfigError(f"train_generator.{name}", f"the released file is task {task['task']!r} with block {task['block']}, "
                          f"the entry says {g.task!r} with {list(g.block)}")
    tokenizer = f"{dag.folder(cfg, 'train_tokenizer', dag.gen_tokenizer(cfg, name))}/tokenizer.pt"
    ckpt.update(tokenizer=tokenizer, sha256=sha, released_file=src, params=to_dict(g))
    c = ckpt["config"]
    export_released(paths, "generator", ckpt, {
        "source": "released", "checkpoint": src, "sha256": sha, "params": sum(v.numel() for v in ckpt["model"].values()),
        "n_layer": c["n_layer"], "n_embd": c["n_embd"], "n_head": c["n_head"], "task": task["task"], "block": task["block"],
        "ignored": ckpt["ignored"], "generation_steps": count_steps(TaskLayout.from_dict(task))}, HISTORY_COLUMNS)
    return paths.folder
