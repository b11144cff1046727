"""The ``nbp`` command: one subcommand per DAG stage, plus utilities.

A stage subcommand has the stage's name (the same name as its params section, its dvc.yaml
stage, its Snakemake rule and its output folder ``{run.out}/{stage}/{entry}``). It takes the
entry to run (default: every entry that ``run`` selects) and ``--params``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from nbp import __version__, dag
from nbp.config import DEFAULT_PARAMS, SCHEMA_PATH, Config, ConfigError, json_schema, load_config, read_yaml
from nbp.errors import NbpError, NotBuiltError, say

# utility -> (module with add_arguments(parser) and main(args) -> int, help)
UTILITIES: dict[str, tuple[str, str]] = {
    "fvd": ("nbp.metrics.fvd_cli", "FVD between two folders of videos or two feature/statistics files"),
    "import-checkpoint": ("nbp.released", "convert a released tokenizer/generator checkpoint into ours"),
    "sample": ("nbp.generator.sample_cli", "write videos from a generator checkpoint"),
    "select": ("nbp.suites", "set the `run` switch of params.yaml to a named experiment suite"),
    "smoke": ("nbp.smoke", "select a paper suite and shrink it in size only (a CPU smoke run of the whole DAG)"),
    "dag": ("nbp.dag", "print (or --write, --check) dvc.yaml generated from the stage description in nbp/dag.py"),
}


def _entries(cfg: Config, stage: str, name: str | None) -> list[str | None]:
    family = dag.BY_NAME[stage].family
    if family is None:
        return [None]
    section = getattr(cfg, stage)
    if name is not None:
        cfg.entry(stage, name)  # raises a ConfigError naming the stage and entry
        return [name]
    return [n for n in getattr(cfg.run, family) if n in section]


def _load_impl(spec: str):
    module, func = spec.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise NotBuiltError(f"`{spec}` is not built yet") from None
        raise
    return getattr(mod, func)


def _validate(cfg: Config) -> None:
    """Everything knowable before the run's stages run (nbp.validate), for the run's whole selection: `nbp check`,
    and every stage command that DVC runs (DVC sets DVC_STAGE), so that `dvc repro` stops at its first stage, not
    after hours of training. Snakemake checks the same when it parses the Snakefile. A stage called by hand runs
    only its own checks (its params may be fine for it and not for the whole DAG, e.g. clips too short for rFVD)."""
    from nbp import validate  # imports torch: not for `nbp --help`

    dag.check_wiring(cfg)
    validate.check_consistency(cfg)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(item, "override must be KEY=VALUE (e.g. -S train_tokenizer.embedded.steps=10)")
        k, v = item.split("=", 1)
        out[k] = read_yaml(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbp",
        description="Next-Block Prediction video generation: the pipeline's stages and tools. "
        "Stages run the entries that params.yaml's `run` section selects, or the one you name.",
        epilog="DAG: download -> prepare -> train_tokenizer -> eval_tokenizer; train_tokenizer -> tokenize -> "
        "train_generator -> eval_generator -> tables (fetch_detector, real_stats feed the FVDs). "
        "Run everything with `dvc repro` or `snakemake -c2`.",
    )
    parser.add_argument("--version", action="version", version=f"nbp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for s in dag.STAGES:
        where = "tables.out (results/)" if s.root == "tables.out" else (
            f"{{run.out}}/{s.name}" + ("" if s.is_global else "/ENTRY"))
        p = sub.add_parser(s.name, help=s.help, description=f"Stage `{s.name}`: {s.help}. Output: {where}.")
        if s.family is not None:
            p.add_argument("name", nargs="?", help=f"entry of params `{s.name}` (default: those in run.{s.family})")
        p.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
        p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter for this call, e.g. -S train_tokenizer.embedded.steps=10")
        for flag, flag_help in s.options:
            p.add_argument(flag, action="store_true", help=flag_help)
    for name, (_, help_) in UTILITIES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_utility=name)
    p = sub.add_parser("schema", help="print (or --write) the JSON schema of params.yaml")
    p.add_argument("--write", action="store_true", help=f"write it to {SCHEMA_PATH.relative_to(SCHEMA_PATH.parents[2])}")
    p = sub.add_parser("check", help="validate params.yaml and print the selected entries")
    p.add_argument("--params", default=DEFAULT_PARAMS)
    return parser


def _add_utility_args(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Utility parsers are filled lazily so `nbp --help` never imports torch-heavy modules."""
    if not argv or argv[0] not in UTILITIES:
        return
    module = UTILITIES[argv[0]][0]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return
        raise
    mod.add_arguments(sub.choices[argv[0]])


def run(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _add_utility_args(parser, argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "schema":
        text = json.dumps(json_schema(), indent=2) + "\n"
        if args.write:
            SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
            SCHEMA_PATH.write_text(text)
            print(f"wrote {SCHEMA_PATH}")
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "check":
        cfg = load_config(args.params)
        _validate(cfg)
        print(f"{args.params}: ok")
        for s in dag.STAGES:
            print(f"  {s.name}: {', '.join(str(e) for e in _entries(cfg, s.name, None)) if s.family else '(global)'}")
        return 0
    if getattr(args, "_utility", None):
        module = UTILITIES[args.command][0]
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                raise NotBuiltError(f"`nbp {args.command}` is not built yet") from None
            raise
        return int(mod.main(args) or 0)
    cfg = load_config(args.params, overrides=_parse_overrides(args.set))
    stage = dag.BY_NAME[args.command]
    entries = _entries(cfg, stage.name, getattr(args, "name", None))
    if "DVC_STAGE" in os.environ:
        _validate(cfg)
    fn = _load_impl(stage.impl)
    extra = {}
    for flag, _ in stage.options:
        key = flag.lstrip("-").replace("-", "_")
        if getattr(args, key, False):
            extra[key] = True
    if stage.launch == "torchrun":  # its ranks join a process group: closed at exit, on success and on failure
        import atexit

        from nbp.distributed import cleanup_distributed

        atexit.register(cleanup_distributed)  # at exit, not after the stage: one process may run several stages
    for entry in entries:
        fn(cfg, entry, dag.resolve(cfg, stage.name, entry), **extra)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input ends in one line on stderr and a non-zero exit, never a traceback."""
    try:
        return run(argv)
    except ConfigError as e:
        say(f"nbp: error: {e}")
        return 2
    except NotBuiltError as e:
        say(f"nbp: not built yet: {e}")
        return 3
    except NbpError as e:
        say(f"nbp: error: {e}")
        return 1
    except KeyboardInterrupt:
        say("nbp: interrupted")
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
