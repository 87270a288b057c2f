"""Runs train.py and kills its own process with SIGKILL after optimizer step N of this process's
run, once: the file KILL_ONCE says it was done, so the run started again (the same command) goes on.

    export KILL_ONCE=/tmp/killed KILL_AT=10 KILL_RANK=1
    accelerate launch --max_restarts 2 ... tests/template/kill_once.py [train.py options]

No hook of this kind ships in train.py; the kill is a real one (kill -9 of one worker).
"""

import os
import signal
import sys

sys.path.insert(0, os.getcwd())  # the train.py of the folder it runs in (the tests: their copy)
sys.argv = ["train.py", *sys.argv[1:]]
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import train  # noqa: E402

MARKER, AT, RANK = (
    os.environ["KILL_ONCE"],
    int(os.environ["KILL_AT"]),
    os.environ.get("KILL_RANK", "0"),
)
steps = [0]


def count(optimizer, args, kwargs):
    steps[0] += 1
    if steps[0] == AT and os.environ.get("RANK", "0") == RANK and not os.path.exists(MARKER):
        open(MARKER, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


register_optimizer_step_post_hook(count)
train.main()
