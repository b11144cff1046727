"""``nbp smoke SUITE``: a paper suite shrunk in size only, to run end to end (CPU, minutes) before GPU-days.

It selects the suite (as ``nbp select``) and then sets, for every entry the suite runs or reads, only the keys of
:data:`SIZE_KEYS`: step counts, numbers of videos, clips and K600 archives, model widths and depths, batch sizes, and the
step-valued schedule keys scaled with the step count (``warmup_steps``, ``disc_start``, ``image_steps``: the same
fraction of training as the paper's recipe). Everything else stays as params.yaml says: perceptual loss,
discriminator type, EMA, LeCam, task, block layouts, text ids, sampling filter, seeds, frames, resolutions, strategy.
One key that is not a size is set too, :data:`LABEL` (``tables.smoke: true``): the tables then mark every row of
ours as a smoke run, so that its numbers cannot be read as paper-scale ones.

Resolutions and frame counts are not shrunk: the paper's 17 x 128 x 128 clips give the base tokenizer's
5 x 16 x 16 latent grid, the smallest grid on which every block layout of the suites (1x16x16, 2x1x8 with its
1x1x16 tail, 2x2x2 with its 1x2x4 tail) is still the same layout.

The file is edited in place (round-trip YAML: comments and anchors stay), and kept only when it parses to the old
params with exactly the suite's run lists and the overlay's keys changed. Undo with ``git checkout params.yaml``.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from nbp.config import DEFAULT_PARAMS, ConfigError, load_config, read_yaml
from nbp.io import write_text
from nbp.suites import SUITES, select

STEPS = {"train_tokenizer": 2, "train_generator": 2}


def _by_preset(table: dict[str, int]):
    """A smoke value chosen by the entry's preset (keeps base < xl < 3b apart in the tables)."""
    return lambda entry: table[entry.preset]


SKIP = object()  # a callable's answer: the key is left as it is for this entry


def _k600_archives(n: int):
    """``max_archives`` of a k600 download entry: at most ``n`` per split it fetches (a smaller limit of the
    params stays); other sources have no archive lists (:data:`SKIP`)."""
    def value(entry):
        if entry.source != "k600":
            return SKIP
        have = entry.max_archives or {}
        return {s: n if have.get(s) is None else min(n, have[s]) for s in entry.splits}
    return value


# section -> key -> smoke value; None: scaled with the entry's step count (see :func:`_scaled`); a callable: of the entry
SIZE_KEYS: dict[str, dict[str, object]] = {
    # K600: the first archive of each split's list (a local copy in `root` is linked whole, whatever this says)
    "download": {"max_archives": _k600_archives(1)},
    "prepare": {"max_videos": {"train": 6, "val": 4}, "train_clips_per_video": 1},
    "real_stats": {"num_videos": 4, "batch_size": 2},
    "train_tokenizer": {"steps": STEPS["train_tokenizer"], "batch_size": 1, "image_batch_size": 1, "channels": 32,
                        "res_blocks": 1,
                        "disc_channels": 8, "checkpoint_every": STEPS["train_tokenizer"], "log_every": 1,
                        "warmup_steps": None, "disc_start": None, "image_steps": None},
    "eval_tokenizer": {"num_videos": 2, "batch_size": 2, "grid_videos": 2},
    "tokenize": {"batch_size": 2, "train_clips_per_video": 1},
    "train_generator": {"steps": STEPS["train_generator"], "batch_size": 2, "n_layer": _by_preset({"base": 2, "xl": 3, "3b": 4}),
                        "n_head": 2, "n_embd": 64,
                        "val_every": STEPS["train_generator"], "val_clips": 2, "checkpoint_every": STEPS["train_generator"],
                        "log_every": 1, "warmup_steps": None},
    "eval_generator": {"num_videos": 2, "batch_size": 2, "grid_videos": 2},
}
LABEL = ("tables", "smoke")  # the one non-size key: marks the tables' rows as smoke runs
# a released file fixes its own sizes
RELEASED_KEEP = {"train_tokenizer": ("channels", "res_blocks"), "train_generator": ("n_layer", "n_head", "n_embd")}


def _scaled(value: int, paper_steps: int, steps: int) -> int:
    """A step-valued key at the same fraction of training (0 stays 0, a positive value stays >= 1 and < steps)."""
    if value <= 0:
        return 0
    return min(steps - 1, max(1, round(value * steps / paper_steps)))


def overlay(params: str | Path, suite: str) -> dict[tuple[str, str, str], object]:
    """(section, entry, key) -> smoke value for every entry ``suite`` runs or reads (params read as selected)."""
    from nbp.validate import involved  # imports torch

    cfg = load_config(params)
    use = involved(cfg, SUITES[suite][1])
    # every generator on the suite's tokens too (k600's and k600_ablations' share a YAML anchor: shrinking one
    # entry of it shrinks the others, so all of them are shrunk explicitly, and the two suites share their stages)
    use["train_generator"] += [n for n, g in cfg.train_generator.items()
                               if g.tokens in use["tokenize"] and n not in use["train_generator"]]
    use["eval_generator"] += [n for n, e in cfg.eval_generator.items()
                              if e.generator in use["train_generator"] and n not in use["eval_generator"]]
    out: dict[tuple[str, str, str], object] = {}
    for section, keys in SIZE_KEYS.items():
        for name in use.get(section, []):
            entry = getattr(cfg, section)[name]
            released = getattr(entry, "source", "train") == "released"
            for key, value in keys.items():
                if released and key in RELEASED_KEEP.get(section, ()):
                    continue  # a released file fixes its own sizes
                if value is None:
                    value = _scaled(getattr(entry, key), entry.steps, STEPS[section])
                elif callable(value):
                    value = value(entry)
                    if value is SKIP:
                        continue
                if section == "prepare" and key == "max_videos":
                    value = {k: min(v, entry.max_videos.get(k, v)) for k, v in value.items()}
                out[(section, name, key)] = value
    return out


def _roundtrip():
    from ruamel.yaml import YAML

    y = YAML()  # round trip: comments, anchors, flow style stay
    y.width = 4096
    y.preserve_quotes = True
    y.representer.add_representer(type(None), lambda r, d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def apply(text: str, values: dict[tuple[str, str, str], object]) -> str:
    """``text`` with the overlay's keys set (and ``tables.smoke: true``), comments and anchors kept."""
    y = _roundtrip()
    doc = y.load(text)
    for (section, name, key), value in values.items():
        doc[section][name][key] = value
    doc.setdefault(LABEL[0], {})[LABEL[1]] = True
    buf = io.StringIO()
    y.dump(doc, buf)
    return buf.getvalue()


def expected_after(before: dict, values: dict[tuple[str, str, str], object]) -> dict:
    """The parsed params the overlay must produce: ``before`` with exactly the overlay's keys set."""
    import copy

    after = copy.deepcopy(before)
    for (section, name, key), value in values.items():
        after[section][name][key] = value
    after.setdefault(LABEL[0], {})[LABEL[1]] = True
    return after


def smoke(params: str | Path, suite: str) -> dict[tuple[str, str, str], object]:
    """Select ``suite`` in ``params`` and shrink it in place; nothing is written unless the edit is proven."""
    path = Path(params)
    select(path, suite)
    values = overlay(path, suite)
    before_text = path.read_text()
    before = read_yaml(before_text)
    text = apply(before_text, values)
    if read_yaml(text) != expected_after(before, values):
        raise ConfigError("", "could not apply the smoke overlay without changing other keys; apply the keys "
                          "`nbp smoke --list` prints by hand", str(path))
    tmp = path.with_name(f".{path.name}.smoke.tmp")
    tmp.write_text(text)
    try:
        load_config(tmp)
    finally:
        tmp.unlink()
    write_text(path, text)
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=list(SUITES), metavar="SUITE", help=f"one of: {', '.join(SUITES)}")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file to rewrite (default: params.yaml)")
    parser.add_argument("--list", action="store_true", help="print the overlay's keys (dvc exp run -S form), write nothing")


def main(args: argparse.Namespace) -> int:
    if args.list:
        for (section, name, key), value in overlay(args.params, args.suite).items():
            print(f"-S '{section}.{name}.{key}={value}'")
        print(f"-S '{LABEL[0]}.{LABEL[1]}=true'")
        return 0
    values = smoke(args.params, args.suite)
    print(f"{args.params}: suite {args.suite!r} selected and shrunk in size only ({len(values)} keys; "
          "undo: git checkout params.yaml)")
    print("next: `dvc repro` or `snakemake -c2` (or `--profile workflow/profiles/slurm`); tables mark the rows 'smoke'")
    return 0
