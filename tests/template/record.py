"""Runs train.py and records which training examples each optimizer step took on this process.

    # writes /tmp/run.<rank>.json
    RECORD=/tmp/run accelerate launch tests/template/record.py [train.py options ...]

An example is named by its token ids (padding left out), so records of runs with other numbers of
processes, batch splits and padding compare. No hook of this kind ships in train.py.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the train.py of the folder it runs in (the tests: their copy)
sys.argv = ["train.py", *sys.argv[1:]]
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import modeling  # noqa: E402
import train  # noqa: E402

steps, current = [], []
forward = modeling.Model.forward
output = Path(f"{os.environ['RECORD']}.{os.environ.get('RANK', '0')}.json")


def recording(self, **batch):
    if self.training:  # not validation, not the checks before the first step
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            current.append(" ".join(str(i) for i, m in zip(ids, mask) if m))
    return forward(self, **batch)


def stepped(*_):
    if not current:  # not a training step: torch.distributed.checkpoint's set_optimizer_state_dict
        return  # runs an empty one to create the optimizer's state before loading it
    steps.append(sorted(current))
    current.clear()
    output.write_text(json.dumps(steps))  # at every step: several processes end with os._exit


modeling.Model.forward = recording
register_optimizer_step_post_hook(stepped)
train.main()
