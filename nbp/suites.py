"""``nbp select SUITE``: point the ``run`` switch of params.yaml at a named set of experiments.

Only the ``datasets``, ``tokenizers`` and ``generators`` lines of the ``run`` section are rewritten; every
other line (comments, anchors, the other sections) stays byte for byte. That holds for any layout of those lists
(flow, wrapped, block lists as ``dvc exp run`` writes them); a ``run`` section in another form (a flow mapping) is
written anew as a block mapping. Nothing is written unless the result provably differs only in the run lists.

DVC (``foreach: ${run.*}``) and Snakemake both read the same switch, so after ``nbp select k600`` both
``dvc repro`` and ``snakemake`` run the K600 experiments. (Without editing the file: ``dvc exp run -S 'run.generators=[...]'`` or
``snakemake --config 'run={...}'``.)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from nbp.config import DEFAULT_PARAMS, ConfigError, load_config, read_yaml
from nbp.dag import check_wiring
from nbp.io import write_text

KEYS = ("datasets", "tokenizers", "generators")

# suite -> (what it reproduces, run lists)
SUITES: dict[str, tuple[str, dict[str, list[str]]]] = {
    "embedded": ("the embedded experiment: synthetic moving shapes, small tokenizer, tiny NBP and NTP (CPU, minutes)", {
        "datasets": ["embedded"], "tokenizers": ["embedded"], "generators": ["embedded_nbp", "embedded_ntp"]}),
    "ucf101": ("UCF-101: tokenizer (Table 7) and class-conditional NBP 700M / 1.2B / 3B (Table 2)", {
        "datasets": ["ucf101"], "tokenizers": ["ucf101"], "generators": ["ucf_base_nbp16", "ucf_xl_nbp16", "ucf_3b_nbp16"]}),
    "k600": ("K600: tokenizer (Table 7), NBP and NTP frame prediction at 700M / 1.2B / 3B (Tables 1 and 2)", {
        "datasets": ["k600"], "tokenizers": ["k600"],
        "generators": ["k600_base_nbp16", "k600_xl_nbp16", "k600_3b_nbp16", "k600_base_ntp", "k600_xl_ntp", "k600_3b_ntp"]}),
    "k600_ablations": ("K600 700M block sizes 1/8/16/32/64/256 (Figure 7) and block shapes (Table 3)", {
        "datasets": ["k600"], "tokenizers": ["k600"],
        "generators": ["k600_base_ntp", "k600_base_nbp8", "k600_base_nbp16", "k600_base_nbp32", "k600_base_nbp64",
                       "k600_base_nbp256", "k600_base_b1x4x4", "k600_base_b2x1x8", "k600_base_b2x2x2"]}),
    "released": ("the released checkpoints (UCF-101 and K600 tokenizers and NBP 700M): import, then evaluate only", {
        "datasets": ["ucf101", "k600"], "tokenizers": ["released_ucf", "released_k600"],
        "generators": ["released_ucf_nbp16", "released_k600_nbp16"]}),
}


def _union(*names: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in KEYS}
    for n in names:
        for k in KEYS:
            out[k] += [e for e in SUITES[n][1][k] if e not in out[k]]
    return out


SUITES["paper"] = ("every paper experiment we train: ucf101 + k600 + k600_ablations", _union("ucf101", "k600", "k600_ablations"))


def _flow(names: list[str]) -> str:
    return "[" + ", ".join(names) + "]"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _value_end(body: list[str], idx: int, indent: int) -> int:
    """One past the last line of the value whose key is on ``body[idx]`` (at ``indent`` spaces).

    Its continuation lines are indented deeper (a block list, a flow list wrapped over lines) or, for a block list
    written without indentation (``key:`` then ``- item`` at the key's column, as DVC's YAML dump writes it), start
    with ``-`` at the key's column. Blank and comment lines after the value are not part of it."""
    last = idx
    for j in range(idx + 1, len(body)):
        line = body[j].rstrip("\r\n")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if _indent(line) > indent or (_indent(line) == indent and (stripped == "-" or stripped.startswith("- "))):
            last = j
            continue
        break
    return last + 1


def rewrite_run(text: str, lists: dict[str, list[str]], source: str = DEFAULT_PARAMS) -> str:
    """``text`` with the given keys of its top-level ``run:`` mapping replaced by flow lists; nothing else changes.

    A key's old value may be a flow list (on one line or wrapped) or a block list (indented, or at the key's column
    as ``dvc exp run`` leaves it); its trailing comment on the key line is kept. :func:`select` checks the result.
    """
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.match(r"run:\s*(#.*)?$", ln.rstrip("\r\n"))), None)
    if start is None:
        raise ConfigError("run", "no top-level block mapping `run:` to rewrite (edit the run lists by hand)", source)
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    body = lines[start + 1:end]
    indent = next((_indent(ln) for ln in body if re.match(r"\s+[^\s#]", ln)), 2)
    newline = "\r\n" if lines[start].endswith("\r\n") else "\n"
    for key, names in lists.items():
        pat = re.compile(rf" {{{indent}}}{key}:(?P<value>[^#\r\n]*)(?P<comment>#.*)?$")
        idx = next((i for i, ln in enumerate(body) if pat.match(ln.rstrip("\r\n"))), None)
        new = f"{' ' * indent}{key}: {_flow(names)}"
        if idx is None:
            last = max((i for i, ln in enumerate(body) if ln.strip() and not ln.strip().startswith("#")), default=-1)
            body.insert(last + 1, new + newline)
            continue
        m = pat.match(body[idx].rstrip("\r\n"))
        comment = f"  {m.group('comment')}" if m.group("comment") else ""
        body[idx:_value_end(body, idx, indent)] = [new + comment + newline]
    return "".join(lines[:start + 1] + body + lines[end:])


def _parse(text: str, source: str) -> dict:
    import yaml

    try:
        raw = read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError("", f"not valid YAML ({where}{getattr(e, 'problem', None) or e})", source) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("run"), dict):
        raise ConfigError("run", "no top-level `run` mapping", source)
    return raw


def regenerate_run(text: str, run: dict, source: str = DEFAULT_PARAMS) -> str:
    """``text`` with its whole top-level ``run`` section (any style: block or flow mapping) written anew as a block
    mapping of ``run`` (comments inside the section are lost; every other line stays). The fallback of :func:`select`
    when :func:`rewrite_run` cannot edit the lists in place."""
    import yaml

    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.match(r"run\s*:", ln)), None)
    if start is None:
        raise ConfigError("run", "no top-level `run` section", source)
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next section stay
        end -= 1
    def flow(v) -> str:  # one value on one line: [a, b], {k: v}, a scalar
        out = yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10**6)
        return out.removesuffix("\n...\n").strip()

    body = "".join(f"  {k}: {flow(v)}\n" for k, v in run.items())
    return "".join(lines[:start]) + "run:\n" + body + "".join(lines[end:])


def select(params: str | Path, suite: str) -> dict[str, list[str]]:
    """Rewrite ``run`` of ``params`` to ``suite`` (validated before the file is replaced).

    Works on any params.yaml, whatever the style of its lists (e.g. after ``dvc exp run`` rewrote the file): the run
    lists are edited in place (:func:`rewrite_run`), or else the run section is written anew (:func:`regenerate_run`);
    a result is kept only when it parses to the old file with exactly the suite's run lists. Otherwise it fails in
    one line and writes nothing."""
    if suite not in SUITES:
        raise ConfigError("", f"unknown suite {suite!r} (known: {', '.join(SUITES)})", "nbp select")
    path = Path(params)
    lists = SUITES[suite][1]
    try:
        before = path.read_text()
    except OSError as e:
        raise ConfigError("", f"cannot read ({e.strerror})", str(path)) from None
    old = _parse(before, str(path))
    expected = {**{k: v for k, v in old.items() if k != "run"}, "run": {**old["run"], **lists}}

    def proven(edit) -> str | None:
        try:
            text = edit()
            return text if _parse(text, str(path)) == expected else None
        except ConfigError:
            return None

    text = proven(lambda: rewrite_run(before, lists, str(path))) or \
        proven(lambda: regenerate_run(before, expected["run"], str(path)))
    if text is None:
        raise ConfigError("run", "could not rewrite the run lists safely (an anchor in the run section used "
                          "elsewhere?); edit run.datasets / run.tokenizers / run.generators by hand", str(path))
    tmp = path.with_name(f".{path.name}.select.tmp")
    tmp.write_text(text)
    try:
        check_wiring(load_config(tmp))
    finally:
        tmp.unlink()
    write_text(path, text)
    return lists


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", choices=list(SUITES), metavar="SUITE",
                        help=f"one of: {', '.join(SUITES)} (omit to list them)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file to rewrite (default: params.yaml)")


def main(args: argparse.Namespace) -> int:
    if args.suite is None:
        for name, (desc, lists) in SUITES.items():
            print(f"{name:15s} {desc}\n{'':15s} generators: {', '.join(lists['generators'])}")
        return 0
    lists = select(args.params, args.suite)
    print(f"{args.params}: run selects suite {args.suite!r}")
    for k in KEYS:
        print(f"  {k}: {', '.join(lists[k])}")
    print("next: `dvc repro` or `snakemake --profile workflow/profiles/slurm` (see README)")
    return 0
