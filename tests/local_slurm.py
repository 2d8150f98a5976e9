"""A real single-node Slurm cluster on this machine's loopback, for the tests: its own munged with a fresh key,
slurmctld and slurmd (Debian's slurm-wlm packages, which `make install` installs), and one node, `localhost`,
with this machine's CPUs and memory in one partition. Every file — slurm.conf, the munge key and socket, state,
spool, pid files and logs — lives in one folder; nothing system-wide is read or changed. Clients reach it through
SLURM_CONF (`cluster.env`).

    with local_slurm(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", "job.sh"], env=cluster.env)
        cluster.wait_for_jobs(timeout=120)
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
# The daemons are in /usr/sbin, which a user's PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def missing_programs() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=SEARCH_PATH) is None]


@dataclass
class Cluster:
    folder: Path
    partition: str
    env: dict[str, str]  # this process's environment with SLURM_CONF naming the cluster's slurm.conf

    def command(self, *args: str) -> str:
        """A Slurm client command's output (it raises with the command's stderr when it fails)."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def jobs(self, states: str = "all") -> list[tuple[str, str, str]]:
        """(job id, name, state) of each job (each array task) the controller still remembers (MinJobAge)."""
        lines = self.command("squeue", "--noheader", "--states", states, "--format", "%i|%j|%T").splitlines()
        return [tuple(line.split("|")) for line in lines]

    def wait_for_jobs(self, timeout: float) -> None:
        """Wait until no job is pending, running or completing; TimeoutError (with the queue) after `timeout` s."""
        deadline = time.monotonic() + timeout
        while queued := self.jobs(states="PENDING,CONFIGURING,RUNNING,COMPLETING,REQUEUED,RESIZING,SUSPENDED"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm jobs still queued after {timeout:.0f} s: {queued}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines: int = 20) -> str:
        """The last lines of each daemon's log (its standard error before it opened its log), for failure
        messages."""
        logs = [path if path.exists() else path.with_suffix(".stderr") for path in
                (self.folder / f"{daemon}.log" for daemon in ("munged", "slurmctld", "slurmd"))]
        return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                         for path in logs if path.exists())


@contextmanager
def local_slurm(folder: Path, partition: str = "cpu", start_timeout: float = 30) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd with their files in `folder`, wait until the node is idle, yield the
    cluster; on exit cancel what is still queued and stop the daemons."""
    missing = missing_programs()
    if missing:
        raise FileNotFoundError(f"Slurm programs not found: {', '.join(missing)} (run `make install`, or apt-get "
                                f"install slurmctld slurmd slurm-client munge)")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # the munge key is the cluster's only secret
    program = {name: shutil.which(name, path=SEARCH_PATH) for name in (*DAEMONS, *CLIENTS)}
    conf = folder / "slurm.conf"
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=SEARCH_PATH)
    daemons: list[subprocess.Popen] = []
    cluster = Cluster(folder, partition, env)
    try:
        subprocess.run([program["mungekey"], "--create", "--keyfile", str(folder / "munge.key")], check=True)
        # --force: munged wants a socket folder every user can enter; this one is the test's own (0700)
        daemons.append(_start([program["munged"], "--foreground", "--force", "--socket", str(folder / "munge.socket"),
                               "--key-file", str(folder / "munge.key"), "--pid-file", str(folder / "munged.pid"),
                               "--seed-file", str(folder / "munged.seed")], folder / "munged.log"))
        _wait(lambda: (folder / "munge.socket").exists(), start_timeout, "munged's socket", daemons, cluster)
        conf.write_text(slurm_conf(folder, partition, _node_hardware(program["slurmd"])))
        daemons.append(_start([program["slurmctld"], "-D", "-i"], folder / "slurmctld.stderr", env))
        daemons.append(_start([program["slurmd"], "-D", "-N", "localhost"], folder / "slurmd.stderr", env))
        _wait(lambda: cluster.command("sinfo", "--noheader", "--nodes", "localhost", "--format", "%t").strip()
              == "idle", start_timeout, "the node to be idle in sinfo", daemons, cluster)
        yield cluster
    finally:
        _stop(cluster, daemons)


def slurm_conf(folder: Path, partition: str, hardware: str) -> str:
    """A minimal single-node configuration: no accounting, no cgroups (processes tracked through /proc), no
    system paths; ports picked free on 127.0.0.1."""
    user = getpass.getuser()  # root, or, as a user, a cluster that runs only that user's jobs
    ctld_port, slurmd_port = _free_ports(2)
    return f"""\
ClusterName=zhlm-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder / "munge.socket"}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# a failed job cancels the jobs that wait on it (afterok), so a broken chain ends instead of waiting forever
SchedulerParameters=kill_invalid_depend
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _node_hardware(slurmd: str) -> str:
    """This machine's CPUs, sockets, cores, threads and RealMemory as slurmd detects them (`slurmd -C`)."""
    found = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return re.sub(r"^NodeName=\S+\s*", "", found)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as output:
        return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait(ready, timeout: float, what: str, daemons: list[subprocess.Popen], cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while True:
        exited = [daemon.args[0] for daemon in daemons if daemon.poll() is not None]
        if exited:
            raise RuntimeError(f"{', '.join(exited)} exited while waiting for {what}\n{cluster.logs()}")
        try:
            if ready():
                return
        except RuntimeError:  # the controller is not answering yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s\n{cluster.logs()}")
        time.sleep(0.2)


def _stop(cluster: Cluster, daemons: list[subprocess.Popen]) -> None:
    """Cancel the jobs still queued (their processes end with them), then stop slurmd, slurmctld and munged."""
    if len(daemons) == 3 and all(daemon.poll() is None for daemon in daemons):
        try:
            cluster.command("scancel", "--user", getpass.getuser())
            cluster.wait_for_jobs(timeout=30)
        except (RuntimeError, TimeoutError):
            pass
    for daemon in reversed(daemons):
        daemon.terminate()
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
