"""Runs train.py and kills its own process with SIGKILL after optimizer step N of this process's
run, once: the file KILL_ONCE says it was done, so the run started again (the same command) goes on.
KILL_SIGNAL=TERM sends SIGTERM to the whole process group instead (as Slurm or `docker stop` do).

    export KILL_ONCE=/tmp/killed KILL_AT=10 KILL_RANK=1
    accelerate launch --max_restarts 2 ... tests/template/kill_once.py [train.py options]

No hook of this kind ships in train.py; the kill is a real one (kill -9 of one worker).
"""

import os
import signal
import sys

sys.path.insert(0, os.getcwd())  # the train.py of the folder it runs in (the tests: their copy)
sys.argv = ["train.py", *sys.argv[1:]]
import train  # noqa: E402
from core import step  # noqa: E402

MARKER, AT, RANK = (
    os.environ["KILL_ONCE"],
    int(os.environ["KILL_AT"]),
    os.environ.get("KILL_RANK", "0"),
)
steps = [0]


def counted(*args, **kwargs):
    """train.py's optimizer step, counted: once a step (a torch optimizer's own step hook would fire
    once per parameter group under DeepSpeed ZeRO, which steps each group by itself)."""
    skipped = real_step(*args, **kwargs)
    steps[0] += 1
    if steps[0] == AT and os.environ.get("RANK", "0") == RANK and not os.path.exists(MARKER):
        open(MARKER, "w").close()
        if os.environ.get("KILL_SIGNAL") == "TERM":
            os.killpg(os.getpgid(0), signal.SIGTERM)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return skipped


real_step, step.optimizer_step = step.optimizer_step, counted
train.main()
