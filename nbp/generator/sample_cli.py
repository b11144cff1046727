"""``nbp sample``: write videos from a generator checkpoint (ours or a released ``.ckpt``).

    nbp sample out/train_generator/embedded_nbp/generator.pt --classes Circle 3 --num 4 --out samples/
    nbp sample k600.ckpt --tokenizer magvit2_k600.pt --context clip.mp4 --top-k 16000 --top-p 0.9 --out pred/

Class-conditional models take ``--classes`` (labels or names); frame-prediction models take ``--context``
(a video whose first frames, 2 latent frames = 5 frames for K600, are encoded and continued); unconditional
models take ``--num``. Writes one mp4 per video plus ``grid.mp4`` / ``grid.gif``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from nbp.data.video_io import read_clip, to_uint8_video, video_grid, write_gif, write_video
from nbp.distributed import resolve_device
from nbp.errors import NbpError
from nbp.generator import load_generator
from nbp.generator.evaluate import context_pixel_frames
from nbp.generator.sampling import codes_of, count_steps, prompt_ids
from nbp.tokenizer import load_magvit2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="generator.pt (ours) or a released .ckpt")
    parser.add_argument("--tokenizer", help="tokenizer.pt or magvit2_*.pt (default: the one the generator was trained on)")
    parser.add_argument("--classes", nargs="+", help="class labels (0-based) or names, for class-conditional models")
    parser.add_argument("--context", help="video file whose first frames are continued (frame-prediction models)")
    parser.add_argument("--num", type=int, default=1, help="videos per class / per context / in total (unconditional)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale t: (1 + t) cond - t uncond")
    parser.add_argument("--cfg-schedule", choices=["constant", "linear"], default="constant")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the written videos (and of the context clip)")
    parser.add_argument("--device", default="auto")


def resolve_classes(items: list[str], classes: list[dict], num_classes: int) -> list[tuple[int, str]]:
    """Labels or names (``name`` or ``text`` of classes.json) -> [(label, name)]."""
    by_name = {c["name"].lower(): c for c in classes} | {str(c.get("text", "")).lower(): c for c in classes}
    out = []
    for item in items:
        if item.isdigit():
            label = int(item)
            if label >= num_classes:
                raise NbpError(f"--classes: label {label} is out of range (the model knows {num_classes} classes)")
            name = next((c["name"] for c in classes if int(c["label"]) == label), f"class{label}")
        elif item.lower() in by_name:
            c = by_name[item.lower()]
            label, name = int(c["label"]), c["name"]
        else:
            known = ", ".join(c["name"] for c in classes[:12]) or "none stored; use labels"
            raise NbpError(f"--classes: unknown class {item!r} (known: {known})")
        out.append((label, name))
    return out


def read_context(path: str, frames: int, size: int, fps: float) -> torch.Tensor:
    """The first ``frames`` frames of a video at ``fps``, resized to size x size -> float [1, 3, frames, size, size]."""
    clip = read_clip(path, frames=frames, fps=fps, start="first", size=size)  # uint8 [frames, H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2)[None].float().div_(255.0)  # [1, 3, T, H, W]


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    gen = load_generator(args.checkpoint, device)
    task = gen.task
    tok_path = args.tokenizer or gen.tokenizer
    if not tok_path:
        raise NbpError(f"{args.checkpoint}: no tokenizer recorded in the checkpoint; pass --tokenizer")
    T, H, W = task.layout.grid
    tok = load_magvit2(tok_path, device=device)
    size = H * tok.config.spatial_factor
    if task.task in ("class", "hybrid"):
        if not args.classes:
            raise NbpError(f"{args.checkpoint}: a {task.task} model needs --classes")
        chosen = resolve_classes(args.classes, gen.classes, task.num_classes)
        labels = torch.tensor([lab for lab, _ in chosen for _ in range(args.num)], device=device)
        prompt = prompt_ids(task, labels=labels)
        names = [f"{name}_{i}" for _, name in chosen for i in range(args.num)]
    elif task.task == "frame_pred":
        if not args.context:
            raise NbpError(f"{args.checkpoint}: a frame-prediction model needs --context VIDEO")
        frames = context_pixel_frames(task.context_frames, tok.config.temporal_factor)
        clip = read_context(args.context, frames, size, args.fps).to(device)
        with torch.no_grad():
            codes = tok.encode_codes(clip).long()  # [1, context_frames, H', W']
        prompt = prompt_ids(task, context=codes.expand(args.num, -1, -1, -1))
        names = [f"{Path(args.context).stem}_{i}" for i in range(args.num)]
    else:
        prompt = prompt_ids(task, batch=args.num).to(device)
        names = [f"sample_{i}" for i in range(args.num)]
    rng = torch.Generator(device=device).manual_seed(args.seed)
    ids = gen.generate(prompt.to(device), greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       cfg=args.cfg, cfg_schedule=args.cfg_schedule, generator=rng, show_progress=True)
    with torch.no_grad():
        videos = to_uint8_video(tok.decode_codes(codes_of(task, ids)))  # [N, T, H, W, 3]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, video in zip(names, videos):
        write_video(out / f"{name}.mp4", video, fps=args.fps)
    grid = video_grid(videos, ncols=min(len(videos), 8))
    write_video(out / "grid.mp4", grid, fps=args.fps)
    write_gif(out / "grid.gif", grid, fps=args.fps)
    print(f"{len(videos)} videos ({count_steps(task)} steps each) -> {out}")
    return 0
