"""A real one-node Slurm on this machine for the tests: munged, slurmctld and slurmd started from
Debian's packages (apt-get install slurmctld slurmd slurm-client munge; .ci/run installs them) with
a configuration of their own in a temporary folder, and stopped by their pids.

    with Cluster(folder) as cluster:
        job = cluster.sbatch("configs/slurm/cpu.sbatch", "--epochs", 3, cwd=repo)
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def missing():
    """Why no cluster can start here (None if it can)."""
    if os.geteuid() != 0:
        return "Slurm's daemons need root here"
    absent = [name for name in DAEMONS if not shutil.which(name)]
    return (
        f"not installed: {', '.join(absent)} (apt-get install slurmctld slurmd slurm-client munge)"
        if absent
        else None
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, folder):
        self.folder, self.processes = Path(folder), []
        self.env = {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}

    def __enter__(self):
        f, host = self.folder, socket.gethostname()
        for name in ("state", "spool"):
            (f / name).mkdir(parents=True)
        (f / "munge.key").write_bytes(os.urandom(1024))
        (f / "munge.key").chmod(0o400)
        (f / "slurm.conf").write_text(
            "\n".join(
                [
                    "ClusterName=template-tests",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={f / 'munge.sock'}",
                    "CredType=cred/munge",
                    f"StateSaveLocation={f / 'state'}",
                    f"SlurmdSpoolDir={f / 'spool'}",
                    f"SlurmctldPidFile={f / 'slurmctld.pid'}",
                    f"SlurmdPidFile={f / 'slurmd.pid'}",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SchedulerType=sched/builtin",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "MpiDefault=none",
                    "KillWait=60",
                    f"SlurmctldLogFile={f / 'slurmctld.log'}",
                    f"SlurmdLogFile={f / 'slurmd.log'}",
                    f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
                    f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        subprocess.run(
            [
                "munged",
                "--force",
                f"--key-file={f / 'munge.key'}",
                f"--socket={f / 'munge.sock'}",
                f"--pid-file={f / 'munged.pid'}",
                f"--log-file={f / 'munged.log'}",
                f"--seed-file={f / 'munge.seed'}",
            ],
            check=True,
        )
        for daemon in ("slurmctld", "slurmd"):
            log = open(f / f"{daemon}.out", "w")
            self.processes.append(
                subprocess.Popen(
                    [daemon, "-D", "-f", f / "slurm.conf"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
            )
        for _ in range(100):  # up in a few seconds
            if "idle" in self.run("sinfo", "-h", "-o", "%t", check=False).stdout:
                return self
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"Slurm did not start: {(f / 'slurmctld.out').read_text()[-2000:]}")

    def __exit__(self, *exc):
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        pid_file = self.folder / "munged.pid"
        if pid_file.is_file():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)

    def run(self, *command, check=True):
        return subprocess.run(
            list(map(str, command)), env=self.env, capture_output=True, text=True, check=check
        )

    def sbatch(self, script, *args, cwd, env=None, options=()):
        """Submits `script` (its #SBATCH lines, then `options`) with train.py options `args`; the
        job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", "--chdir", str(cwd), *options, str(script), *map(str, args)],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip().split(";")[0]

    def state(self, job):
        """The job's state (PENDING, RUNNING, COMPLETED, ...)."""
        return self.run("scontrol", "show", "job", job).stdout.split("JobState=")[1].split()[0]

    def wait(self, job, until, timeout=300):
        deadline = time.monotonic() + timeout
        while self.state(job) not in until:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} is {self.state(job)} after {timeout} s")
            time.sleep(0.5)
        return self.state(job)
