"""``python -m nbp.launch``: torchrun whose failures end in one line.

It takes torchrun's arguments (torch.distributed.run's own parser) and runs torchrun's own ``run`` (the elastic agent
is torch's). What changes is the end of a failed run: torchrun raises ``ChildFailedError`` and prints its traceback
and a failure table after the rank's own one-line error. Here the failure is one line instead, naming the stage and
entry (the words after ``-m nbp``), the first failed rank (torch's root cause) and its exit code, and the launcher
exits with that code, so ``nbp``'s codes (2 bad params, 3 not built, 1 other bad input) reach Slurm and Snakemake. A
rank killed by a signal exits as a shell reports it, 128 + signal. Errors of the launcher itself (a rendezvous
timeout, a signal sent to the launcher) are one line as well.

    python -m nbp.launch --standalone --nproc_per_node=8 -m nbp train_generator k600_base_nbp16

Processes per node: a number asks for that many GPUs' worth of ranks, and runs at most as many ranks as the node
has GPUs, one rank on a machine without any (:func:`fit_to_gpus`). The cluster profile asks for a stage's GPUs;
the same command from ``snakemake -c2`` on a workstation then runs one CPU process instead of eight. The flag
``--ranks-on-cpu`` (ours, before torchrun's arguments) runs the asked number of ranks anyway (gloo on CPU: tests).
"""

from __future__ import annotations

import logging
import signal
import sys

from nbp.errors import say

# the agent's own two lines about a failed rank; the line below replaces them (the rank's error is printed by itself)
_AGENT_FAILURE_LOGS = ("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", "Sending process %s closing signal %s")


def _what(args) -> str:
    """``<stage> <entry>`` of ``-m nbp <stage> <entry> ...`` (else the script or module torchrun runs)."""
    if args.module and args.training_script == "nbp":
        words = []
        for a in args.training_script_args:
            if a.startswith("-") or len(words) == 2:
                break
            words.append(a)
        if words:
            return " ".join(words)
    return f"{'-m ' if args.module else ''}{args.training_script}"


def _world(args) -> str:
    """The number of ranks: nodes x processes per node (``?`` where torch cannot tell before starting)."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    try:
        per_node = determine_local_world_size(args.nproc_per_node)
        low, high = parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError):
        return "?"
    return str(high * per_node) if low == high else f"{low * per_node}-{high * per_node}"


def exit_code(code: int) -> int:
    """A child's exit status as the launcher's: itself when positive, 128 + signal for a child killed by one."""
    if code < 0:
        return 128 + (-code)
    return code if 0 < code < 256 else 1


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class _DropAgentFailureLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in _AGENT_FAILURE_LOGS


def fit_to_gpus(nproc_per_node: str, gpus: int) -> str:
    """A numeric ``--nproc_per_node`` capped at the node's GPUs (at least 1); torchrun's words (gpu, cpu, auto) as
    they are."""
    try:
        asked = int(nproc_per_node)
    except ValueError:
        return nproc_per_node
    return str(max(1, min(asked, gpus)))


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("-m") if "-m" in argv else len(argv)  # our flag only among the launcher's own arguments
    on_cpu = "--ranks-on-cpu" in argv[:cut]
    if on_cpu:
        argv.remove("--ranks-on-cpu")
    args = parse_args(argv)  # torchrun's parser: a bad flag is its usage line and exit 2
    what = _what(args)
    if not on_cpu:
        gpus = torch.cuda.device_count()
        fit = fit_to_gpus(args.nproc_per_node, gpus)
        if fit != args.nproc_per_node:
            say(f"nbp: {what}: {args.nproc_per_node} processes per node asked, {gpus} GPU(s) here: running {fit}")
            args.nproc_per_node = fit
    world = _world(args)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropAgentFailureLogs())
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the earliest failure: the root cause, not the ranks stopped after it
        code = exit_code(failure.exitcode)
        if failure.exitcode < 0:
            how = f"killed by {_signal_name(-failure.exitcode)}, exit code {code}"
            say(f"nbp: {what} failed on rank {rank} of {world} ({how})")
        else:
            say(f"nbp: {what} failed on rank {rank} of {world} (exit code {code}); its error is above")
        return code
    except SignalException as e:  # the launcher was sent a signal (Slurm's SIGTERM at the time limit); ranks stopped
        name = _signal_name(int(e.sigval))
        say(f"nbp: {what} stopped: the launcher received {name} and stopped its ranks")
        return 128 + int(e.sigval)
    except RendezvousTimeoutError:
        say(f"nbp: {what}: the rendezvous timed out before all {args.nnodes} node(s) joined "
            f"(--rdzv_endpoint={args.rdzv_endpoint or '?'})")
        return 1
    except KeyboardInterrupt:
        say(f"nbp: {what} interrupted")
        return 130
    except Exception as e:  # rendezvous timeout or error, a bad launcher setting found late
        say(f"nbp: {what}: the launcher failed: {_first_line(e)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
