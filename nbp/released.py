"""``nbp import-checkpoint SRC DST``: convert a released checkpoint into ours.

- a released tokenizer ``magvit2_*.pt`` (``{'model_state_dict': {'module.*'}}``) -> ``tokenizer.pt``
  (format ``nbp-tokenizer``), through :mod:`nbp.tokenizer.released`;
- a released generator ``*.ckpt`` (Lightning: ``state_dict``, ``hyper_parameters``) -> ``generator.pt``
  (format ``nbp-generator``), through :mod:`nbp.generator.released`; ``--tokenizer-out`` also writes the
  frozen tokenizer it carries (``first_stage_model.*``).

Neither path runs pickled code (weights-only loading; ``argparse.Namespace`` is the one extra allowed global).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nbp.checkpoint import save_checkpoint
from nbp.errors import NbpError
from nbp.generator.released import convert_released, load_allowlisted, tokenizer_state
from nbp.tokenizer import PRESETS, tokenizer_checkpoint
from nbp.tokenizer.released import model_from_released_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="released file: magvit2_*.pt (tokenizer) or *.ckpt (generator)")
    parser.add_argument("dst", help="our checkpoint to write (tokenizer.pt or generator.pt)")
    parser.add_argument("--tokenizer-preset", default=None,
                        help="tokenizer architecture of the file (default: the released base architecture at the "
                             "width read from the file's shapes)")
    parser.add_argument("--block", type=int, default=None, help="generator: tokens per block when hyper_parameters lack it")
    parser.add_argument("--n-head", type=int, default=None, help="generator: attention heads when hyper_parameters lack them")
    parser.add_argument("--context-frames", type=int, default=None,
                        help="generator (K600 layout): latent context frames (default 2)")
    parser.add_argument("--tokenizer-out", default=None,
                        help="generator: also write its frozen tokenizer (first_stage_model.*) here")


def kind_of(obj) -> str:
    """'tokenizer' | 'generator' for a loaded released file."""
    if isinstance(obj, dict) and "model_state_dict" in obj and "format" not in obj:
        return "tokenizer"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return "generator"
    return "unknown"


def import_tokenizer_state(state: dict, dst: Path, preset: str | None, source: str) -> int:
    """Write ``dst`` from a released state dict; returns the tokenizer's base width."""
    if preset is not None and preset not in PRESETS:
        raise NbpError(f"--tokenizer-preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    model = model_from_released_state(state, config=PRESETS[preset] if preset else None, source=source)
    save_checkpoint(dst, tokenizer_checkpoint(model, source="released", released_file=Path(source).name))
    return model.config.channels


def main(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    obj = load_allowlisted(src)
    kind = kind_of(obj)
    if kind == "tokenizer":
        width = import_tokenizer_state(obj["model_state_dict"], dst, args.tokenizer_preset, str(src))
        print(f"{src} -> {dst} (tokenizer, preset {args.tokenizer_preset or 'base'}, width {width})")
        return 0
    if kind != "generator":
        raise NbpError(f"{src}: neither a released tokenizer ('model_state_dict') nor a Lightning generator ('state_dict')")
    ckpt = convert_released(obj, str(src), block=args.block, n_head=args.n_head, context_frames=args.context_frames)
    save_checkpoint(dst, ckpt)
    c, t = ckpt["config"], ckpt["task"]
    ignored = ", ".join(f"{n} {p}* keys" for p, n in ckpt["ignored"].items())
    print(f"{src} -> {dst} (generator: {t['task']}, block {t['block']}, grid {t['grid']}, "
          f"{c['n_layer']} layers x {c['n_embd']}, {c['n_head']} heads; ignored {ignored})")
    if args.tokenizer_out:
        state = tokenizer_state(obj)
        if not state:
            raise NbpError(f"{src}: --tokenizer-out given but the file has no first_stage_model.* keys")
        import_tokenizer_state(state, Path(args.tokenizer_out), args.tokenizer_preset, f"{src} (first_stage_model)")
        print(f"  tokenizer -> {args.tokenizer_out}")
    return 0
