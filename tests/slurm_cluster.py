"""A Slurm cluster on localhost for tests: munged + slurmctld + slurmd, all state in one temporary folder.

One node by default (the machine's host name, all its cores); ``SlurmCluster(nodes=2)`` runs one slurmd per node
(``n1``, ``n2``, ...) on its own port, sharing the machine's cores and the loopback address, so a multi-node job's
``srun`` starts one task per "node". Recipe and pitfalls: shared/SLURM_TESTING.md. The client commands are wrapped
(``<dir>/bin/sbatch`` etc.) so that they find the cluster's ``slurm.conf`` even inside a job, where the Snakemake
executor strips ``SLURM_*`` variables before calling ``srun``; nothing is written outside the folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel", "sacct", "sacctmgr")
SLURM_CONF = """\
ClusterName=nbptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket.2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool{per_node}
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd{per_node}.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd{per_node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=300
EnforcePartLimits=ALL
{nodes}"""
ONE_NODE = """\
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
NODE = ("NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} Sockets=1 CoresPerSocket={cpus} "
        "ThreadsPerCore=1 RealMemory={mem} State=UNKNOWN\n")


def slurm_installed() -> bool:
    return all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in ("slurmctld", "slurmd", "munged"))


def running_cluster(nodes: int = 1):
    """A pytest fixture body: a started :class:`SlurmCluster`, stopped afterwards. Without Slurm the test fails
    under CI (``.ci/run`` installs it) and is skipped elsewhere."""
    if not slurm_installed():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI: slurmctld/slurmd/munged are not installed (.ci/run apt-installs slurm-wlm slurmctld slurmd munge)")
        pytest.skip("Slurm is not installed (apt-get install slurm-wlm slurmctld slurmd slurm-client munge); CI runs this")
    c = SlurmCluster(nodes=nodes)
    try:
        yield c.start()
    finally:
        c.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """Start with :meth:`start`, use :attr:`env` for client commands, end with :meth:`stop`."""

    def __init__(self, nodes: int = 1):
        self.dir = Path(tempfile.mkdtemp(prefix="nbp-slurm-", dir="/tmp"))  # short: unix socket paths <= 108 chars
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ)
        self.pids: list[Path] = []
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]

    def _node_lines(self, mem: int) -> str:
        cpus = os.cpu_count() or 2
        if len(self.nodes) == 1:
            return ONE_NODE.format(host=self.host, cpus=cpus, mem=mem)
        share = max(1, cpus // len(self.nodes))  # the nodes share the machine's cores and memory
        lines = [NODE.format(name=n, host=self.host, port=_free_port(), cpus=share, mem=mem // len(self.nodes))
                 for n in self.nodes]
        return "".join(lines) + f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP\n"

    def _write_files(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log", "bin"):
            (d / sub).mkdir(mode=0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        avail_mb = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemAvailable"))) // 1024
        mem = max(2000 * len(self.nodes), int(avail_mb * 0.5))
        self.conf.write_text(SLURM_CONF.format(host=self.host, d=d, ctld_port=_free_port(), d_port=_free_port(),
                                               per_node="" if len(self.nodes) == 1 else "%n", nodes=self._node_lines(mem)))
        for c in CLIENTS:  # clients that find this cluster's config even without SLURM_CONF (inside jobs)
            real = shutil.which(c)
            if real:
                w = d / "bin" / c
                w.write_text(f"#!/bin/sh\nexport SLURM_CONF={self.conf}\nexec {real} \"$@\"\n")
                w.chmod(0o755)
        self.env["SLURM_CONF"] = str(self.conf)
        self.env["PATH"] = f"{d / 'bin'}{os.pathsep}{self.env.get('PATH', '')}"

    def _daemon(self, argv: list[str], pidfile: Path) -> None:
        res = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed: {res.stderr.strip()}\n{self.logs()}")
        self.pids.append(pidfile)

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_files()
        m = self.dir / "munge"
        self._daemon([_exe("munged"), "--force", f"--socket={m / 'munge.socket.2'}", f"--key-file={m / 'munge.key'}",
                      f"--pid-file={m / 'munged.pid'}", f"--log-file={self.dir / 'log' / 'munged.log'}",
                      f"--seed-file={m / 'munged.seed'}"], m / "munged.pid")
        self._daemon([_exe("slurmctld"), "-f", str(self.conf)], self.dir / "slurmctld.pid")
        several = len(self.nodes) > 1
        for n in self.nodes:  # one slurmd per node name; the config's %n gives each its own spool, pid and log
            self._daemon([_exe("slurmd"), "-f", str(self.conf), *(["-N", n] if several else [])],
                         self.dir / (f"slurmd{n}.pid" if several else "slurmd.pid"))
        end = time.time() + timeout
        state = ""
        while time.time() < end:
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            state = res.stdout.strip()
            if sorted(state.splitlines()) == sorted(f"{n} idle" for n in self.nodes):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"slurm nodes not idle after {timeout}s (state {state!r})\n{self.logs()}")

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, **kw)

    def logs(self) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(out)

    def stop(self) -> None:
        if self.pids:  # a job left by a failed or timed-out test ends with the cluster (its steps outlive slurmd)
            jobs = self.run(["squeue", "-h", "-o", "%i"], timeout=30).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], timeout=30)
                time.sleep(2)
        for pidfile in reversed(self.pids):  # slurmd(s), slurmctld, munged
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
                pass
        self.pids.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
