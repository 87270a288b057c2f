"""Runs train.py and kills the process right after the N-th rename onto a path named NAME.

    accelerate launch tests/template/crash.py NAME N [train.py options ...]   # in the repository

Every step of a checkpoint save that matters ends in an os.replace (a JSON file written via a
temporary, a staging folder published, the previous checkpoint moved aside), so "right after the
N-th os.replace onto NAME" reaches each moment of a save without any hook in the shipped code.
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # the train.py of the folder it runs in (the tests: their copy)
NAME, N = sys.argv[1], int(sys.argv[2])
sys.argv = ["train.py", *sys.argv[3:]]
real_replace, seen = os.replace, 0


def replace(source, destination, *args, **kwargs):
    global seen
    real_replace(source, destination, *args, **kwargs)
    if os.path.basename(os.fspath(destination)) == NAME:
        seen += 1
        if seen == N:
            os._exit(99)


os.replace = replace
import train  # noqa: E402  (after the patch, though os.replace is looked up at call time anyway)

train.main()
