"""Wall time of the pipeline tools on the tiny DAG of the tests: a first run and a repeat (no-op) run through
`dvc repro` and `snakemake -c2`, and (with --slurm, when Slurm is installed) a run through the Slurm profile on a
one-node Slurm on localhost. Writes the ``pipeline_timing`` section of ``results/speed.md``.

    python benchmarks/pipeline_timing.py [--slurm] [--md results/speed.md]

The tiny DAG is the embedded experiment cut to seconds per stage (tests/pipeline_helpers.py: tiny_params); a
repeat run's time is the tool's own overhead (parse, hash or stat every input and output), which is what a
no-op costs on the full embedded experiment too.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pipeline_helpers import dvc, env, ran_dvc, ran_snakemake, snakemake, tiny_repo  # noqa: E402

from nbp.io import write_markdown_section  # noqa: E402


def timed(fn):
    t0 = time.monotonic()
    res = fn()
    return time.monotonic() - t0, res


def best_of(n, fn) -> float:
    return min(timed(fn)[0] for _ in range(n))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slurm", action="store_true", help="also time the Slurm profile on a local one-node Slurm")
    p.add_argument("--md", default=str(ROOT / "results" / "speed.md"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nbp-timing-") as tmp:
        repo = tiny_repo(Path(tmp) / "dvc")
        first, res = timed(lambda: dvc(["repro"], repo))
        assert len(ran_dvc(res.stdout)) == 12, res.stdout
        noop = best_of(3, lambda: dvc(["repro"], repo))
        rows.append(("`dvc repro`", first, noop))

        repo = tiny_repo(Path(tmp) / "snakemake")
        first, res = timed(lambda: snakemake(["-c2"], repo))
        assert len(ran_snakemake(res.stderr)) == 12, res.stderr[-2000:]
        noop = best_of(3, lambda: snakemake(["-c2"], repo))
        rows.append(("`snakemake -c2`", first, noop))

        if args.slurm:
            from slurm_cluster import SlurmCluster, slurm_installed

            if not slurm_installed():
                raise SystemExit("--slurm: Slurm is not installed")
            repo = tiny_repo(Path(tmp) / "slurm")
            cluster = SlurmCluster().start()
            try:
                path = f"{cluster.dir / 'bin'}{os.pathsep}{env()['PATH']}"
                run = lambda: snakemake(["--profile", "workflow/profiles/slurm-cpu-test"], repo, timeout=1800,  # noqa: E731
                                        SLURM_CONF=cluster.env["SLURM_CONF"], PATH=path)
                first, _ = timed(run)
                noop = best_of(3, run)
            finally:
                cluster.stop()
            rows.append(("`snakemake --profile workflow/profiles/slurm-cpu-test` (local one-node Slurm)", first, noop))

    load = os.getloadavg()[0]
    body = [
        "The tiny DAG of the pipeline tests (12 stage instances: the embedded experiment with 2 classes, 32x32 clips, "
        "1 training step, 2 evaluated videos), each tool in a fresh copy of the repository. 'Repeat' is the best of "
        f"3 runs with nothing to do. {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the end "
        "(other work on the machine inflates the first-run times).",
        "",
        "| tool | first run (s) | repeat, nothing to do (s) |",
        "|---|---|---|",
        *[f"| {name} | {a:.1f} | {b:.1f} |" for name, a, b in rows],
        "",
        f"Command: `python benchmarks/pipeline_timing.py{' --slurm' if args.slurm else ''}`",
    ]
    write_markdown_section(Path(args.md), "pipeline_timing", "Pipeline: first and repeat runs (benchmarks/pipeline_timing.py)",
                  "\n".join(body))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
