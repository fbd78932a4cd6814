"""A real SLURM cluster on this machine: munged, slurmctld and two slurmd, each node in a network
namespace of its own with its own hostname, hosts and resolver files.

Layout: a "switch" namespace holds a bridge and slurmctld (10.241.0.1); node1 and node2
(10.241.0.11/12) hang on the bridge through veth pairs. No namespace has a route anywhere else,
and nothing is added to the machine's own network namespace, so no traffic leaves the cluster.
Clients (sbatch, scontrol, squeue) run inside the switch namespace with SLURM_CONF exported.

Facts this relies on (Debian's slurm-wlm 22.05): slurmd starts under `nsenter --net` plus
`unshare --uts --mount` (`ip netns exec` remounts /sys and slurmd then finds no cgroup file
system); munge's socket folder and all its parents must be executable by all;
`cred_expire=10` and `sched_interval=2` make a requeued job start again in about 10 s.
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
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.241.0"
NODES = {"node1": f"{SUBNET}.11", "node2": f"{SUBNET}.12"}
CONTROLLER = ("ctl", f"{SUBNET}.1")

SLURM_CONF = """\
ClusterName=sctdtest
SlurmctldHost={ctl}({ctl_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
LaunchParameters=enable_nss_slurm
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/linear
ReturnToService=2
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=10
InactiveLimit=0
KillWait=30
MinJobAge=600
JobRequeue=1
SlurmdParameters=config_overrides
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterError(RuntimeError):
    """The cluster could not be started here (the reason is the message)."""


def _sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return proc


def why_not() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "ip", "nsenter", "unshare")
               if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: install slurm-wlm and munge (make setup does as root)"
    if os.geteuid() != 0:
        return "the cluster needs root (network namespaces, slurmd as root)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make namespaces here (unshare --net --uts --mount: {probe.stderr.strip()})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A running cluster (see the module docstring); `stop()` removes every trace."""

    base: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    def netns(self, name: str) -> str:
        return f"sctd{self.tag}-{name}"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a client command (and, through sbatch, of the job)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env.update(extra or {})
        return env

    def client(self, *cmd: str, env: dict[str, str] | None = None, check: bool = True,
               cwd: str | Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command inside the switch namespace (where slurmctld listens)."""
        return _sh("nsenter", f"--net=/run/netns/{self.netns('switch')}", *cmd, check=check,
                   env=env or self.env(), cwd=cwd, timeout=timeout)

    # -- bring-up ------------------------------------------------------------------------------
    def _network(self) -> None:
        switch = self.netns("switch")
        _sh("ip", "netns", "add", switch)
        inside = ("ip", "netns", "exec", switch)  # only `ip` runs here: no /sys needed
        _sh(*inside, "ip", "link", "set", "lo", "up")
        _sh(*inside, "ip", "link", "add", "br0", "type", "bridge")
        _sh(*inside, "ip", "addr", "add", f"{CONTROLLER[1]}/24", "dev", "br0")
        _sh(*inside, "ip", "link", "set", "br0", "up")
        for i, (node, addr) in enumerate(NODES.items()):
            ns = self.netns(node)
            _sh("ip", "netns", "add", ns)
            # Both ends are made inside the switch namespace, then one end moves to the node's.
            _sh(*inside, "ip", "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh(*inside, "ip", "link", "set", f"v{i}", "master", "br0", "up")
            node_ns = ("ip", "netns", "exec", ns)
            _sh(*node_ns, "ip", "link", "set", "lo", "up")
            _sh(*node_ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh(*node_ns, "ip", "link", "set", "eth0", "up")

    def _files(self) -> None:
        for sub in ("munge", "state", "run", "log", "spool/node1", "spool/node2", "etc"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        key = self.base / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        (self.base / "munge").chmod(0o755)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in NODES.items()) + \
            f"{CONTROLLER[1]} {CONTROLLER[0]}\n"
        (self.base / "etc" / "hosts").write_text(hosts)
        (self.base / "etc" / "resolv.conf").write_text("# no name servers: nothing leaves the cluster\n")
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={os.cpu_count()} "
                          "State=UNKNOWN" for n, a in NODES.items())
        self.conf.write_text(SLURM_CONF.format(
            ctl=CONTROLLER[0], ctl_addr=CONTROLLER[1], ctld_port=_free_port(), slurmd_port=_free_port(),
            base=self.base, nodes=nodes, node_names=",".join(NODES)))

    def _in_namespace(self, name: str, hostname: str, *cmd: str) -> subprocess.Popen:
        """Start `cmd` in netns `name` with its own hostname and private /etc/hosts, resolv.conf."""
        etc = self.base / "etc"
        script = (f"hostname {hostname} && mount --make-rprivate / && "
                  f"mount --bind {etc}/hosts /etc/hosts && mount --bind {etc}/resolv.conf /etc/resolv.conf "
                  '&& exec "$@"')
        log = open(self.base / "log" / f"{name}.out", "ab")
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns(name)}", "unshare", "--uts",
                                 "--mount", "sh", "-c", script, "sh", *cmd],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)

    def start(self) -> None:
        self._files()
        self._network()
        self.procs["munged"] = subprocess.Popen(
            ["munged", "-F", "-f", f"--socket={self.base}/munge/munge.socket.2",
             f"--key-file={self.base}/munge/munge.key", f"--pid-file={self.base}/munge/munged.pid",
             f"--log-file={self.base}/log/munged.log", f"--seed-file={self.base}/munge/seed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait(lambda: (self.base / "munge" / "munge.socket.2").exists(), 10, "munged did not start")
        self.procs["slurmctld"] = self._in_namespace("switch", CONTROLLER[0], "slurmctld", "-D", "-i",
                                                     "-f", str(self.conf))
        time.sleep(0.5)
        for node in NODES:
            self.procs[node] = self._in_namespace(node, node, "slurmd", "-D", "-N", node, "-f", str(self.conf))
        self.wait_idle(list(NODES), 30)

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited ({proc.returncode}); logs in {self.base / 'log'}: "
                                       f"{self.logs()[-2000:]}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{what} within {timeout} s; logs: {self.logs()[-3000:]}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted((self.base / "log").glob("*")) if p.is_file())

    def node_states(self) -> dict[str, str]:
        out = self.client("sinfo", "-N", "-h", "-o", "%N %t", check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_idle(self, nodes: list[str], timeout: float) -> None:
        self._wait(lambda: all(self.node_states().get(n) == "idle" for n in nodes), timeout,
                   f"nodes {nodes} were not idle")

    # -- jobs ----------------------------------------------------------------------------------
    def sbatch(self, script: str, *args: str, env: dict[str, str], cwd: Path) -> str:
        """Submit; returns the job id."""
        out = self.client("sbatch", "--parsable", *args, script, env=env, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def job_field(self, job_id: str, name: str) -> str:
        """One field of `scontrol show job` ("" when the job is unknown)."""
        out = self.client("scontrol", "show", "job", job_id, "-o", check=False).stdout
        for word in out.split():
            if word.startswith(f"{name}="):
                return word.split("=", 1)[1]
        return ""

    def job_state(self, job_id: str) -> str:
        return self.job_field(job_id, "JobState") or "UNKNOWN"

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        """Wait until the job is in one of `states`; returns it."""
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id)) not in states:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout} s; {self.logs()[-3000:]}")
            time.sleep(0.5)
        return state

    def kill_node(self, node: str) -> None:
        """Lose `node`: SIGKILL its slurmd and every process in its namespace (its tasks)."""
        pids = _sh("ip", "netns", "pids", self.netns(node), check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def signal_tasks(self, node: str, needle: str, sig: str) -> list[int]:
        """Send SIG`sig` to the training processes on `node` whose command line holds `needle`
        (not to the launcher that started them); returns their pids."""
        hit = []
        for pid in _sh("ip", "netns", "pids", self.netns(node), check=False).stdout.split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [a.decode(errors="replace") for a in argv]
            if any(needle in w for w in words) and "torch.distributed.run" not in words:
                try:
                    os.kill(int(pid), getattr(signal, f"SIG{sig}"))
                    hit.append(int(pid))
                except ProcessLookupError:
                    pass
        return hit

    # -- tear-down -----------------------------------------------------------------------------
    def stop(self) -> None:
        for name in (*NODES, "switch"):
            self.kill_node(name)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for name in (*NODES, "switch"):
            _sh("ip", "netns", "del", self.netns(name), check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster() -> Cluster:
    """Start a cluster in a fresh folder under /tmp (world-executable, as munge wants)."""
    reason = why_not()
    if reason is not None:
        raise ClusterError(reason)
    base = Path(tempfile.mkdtemp(prefix="sctd-slurm-", dir="/tmp"))
    base.chmod(0o755)
    cluster = Cluster(base)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
