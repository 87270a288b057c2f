"""Shared fixtures and the two ways to run the real entry point, for the two halves of the suite:

* tests/template/: the loop, checkpoints, resume, faults, options, --check. They run against a
  pinned copy of the sample task (tests/template/task: its modeling.py, dataset.py, model config and
  data), never against the root pair, so a fork that rewrites modeling.py and dataset.py keeps them
  green. Their subprocesses run in TREE, a copy of the template with the pinned pair in it, and
  their in-process runs run there too (the working directory), with the pinned modules imported.
* tests/task/: the root modeling.py and dataset.py (the contract, bad data, predict, the README),
  which a fork rewrites with its task.

`run(...)` calls train.main() in this process (a second or less: nothing to import again), with one
torch thread, as `accelerate launch` gives each process, so its runs are bitwise comparable with
the CLI's. `launch(...)` runs `accelerate launch train.py ...` exactly as a user would; the tests
that need it (several processes, signals, kills) are marked slow. The data is 320 training and 64
validation lines of the sample data: 20 optimizer steps per epoch at a global batch of 16.
"""

import atexit
import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "tests" / "template" / "task"  # the pinned task pair of tests/template
# Tokenized data is cached by the datasets library; the tests use a cache of their own.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="template-tests-datasets-"))
TRAIN_ROWS, VALID_ROWS = 320, 64


def make_tree():
    """TREE: the template's files as they are now, with the pinned task pair, its model config as
    assets/tiny-bert and its data as data/ (copies: Python resolves a symlinked script's folder)."""
    tree = Path(tempfile.mkdtemp(prefix="template-tests-tree-"))
    for name in ("train.py", "predict.py", "utils.py", "requirements.txt", "constraints.txt"):
        shutil.copy(ROOT / name, tree / name)
    for name in ("core", "configs", "tools", "bench"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("modeling.py", "dataset.py"):
        shutil.copy(TASK / name, tree / name)
    shutil.copytree(TASK / "tiny-bert", tree / "assets" / "tiny-bert")
    shutil.copytree(TASK / "data", tree / "data")
    (tree / "tests").mkdir()
    for name in ("crash.py", "record.py", "kill_once.py"):  # scripts the template tests launch
        shutil.copy(ROOT / "tests" / "template" / name, tree / "tests" / name)
    return tree


TREE = make_tree()
atexit.register(shutil.rmtree, TREE, ignore_errors=True)
PAIRS = {}  # "template" / "task": {module name: module} of that pair
ACTIVE = ["task"]


def half(path):
    """Which half of the suite a test file is in: "template" (pinned pair) or "task" (root pair)."""
    return "template" if (ROOT / "tests" / "template") in Path(path).parents else "task"


def home(which=None):
    """The folder the active half runs in: TREE for tests/template, the repository for
    tests/task."""
    return TREE if (which or ACTIVE[0]) == "template" else ROOT


FOLDERS = {
    "template": TASK,
    "task": ROOT,
    "causal_lm": ROOT / "examples" / "causal_lm",
}  # of each pair


def activate(which):
    """Makes `import modeling, dataset, train, predict` give the pair of `which` (FOLDERS: the
    pinned copy for "template", the root files for "task", an example's); train.py and predict.py
    import whichever is active."""
    ACTIVE[0] = which
    if which not in PAIRS:
        for name in ("modeling", "dataset", "train", "predict"):
            sys.modules.pop(name, None)
        folder = FOLDERS[which]
        for name, where in [
            ("modeling", folder),
            ("dataset", folder),
            ("train", ROOT),
            ("predict", ROOT),
        ]:
            spec = importlib.util.spec_from_file_location(name, where / f"{name}.py")
            module = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        PAIRS[which] = {
            name: sys.modules[name] for name in ("modeling", "dataset", "train", "predict")
        }
    sys.modules.update(PAIRS[which])


def pytest_collectstart(collector):
    """A test file imports train, modeling or dataset when it is collected: the pair of its half."""
    if isinstance(collector, pytest.Module):
        activate(half(collector.path))


@pytest.fixture(scope="module", autouse=True)
def pair(request):
    """Before a test file's fixtures and tests: its half's pair, and its working directory."""
    activate(half(request.path))
    previous = os.getcwd()
    os.chdir(home())
    yield ACTIVE[0]
    os.chdir(previous)


DATA = {}


@pytest.fixture(scope="module")
def tiny_data(pair, tmp_path_factory):
    """320 training and 64 validation lines of the half's data (made once per half)."""
    if pair not in DATA:
        folder = DATA[pair] = tmp_path_factory.mktemp(f"data-{pair}")
        for name, rows in [("train", TRAIN_ROWS), ("valid", VALID_ROWS)]:
            lines = (home() / "data" / f"{name}.jsonl").read_text().splitlines()[:rows]
            (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return DATA[pair]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork(folder, edits=None):
    """A copy of the template (train.py, predict.py, core/, utils.py and the pinned pair) in
    folder/fork, with the user files edited the way a forker would: {"modeling.py" or "dataset.py":
    {old text: new text}}, each old text matching exactly once (an empty old text appends the new
    one). train.py and core/ are never edited by their text: a test wraps a function of train.py
    from a small script instead (test_state.py's SCALED), or passes an option."""
    assert set(edits or {}) <= {"modeling.py", "dataset.py"}, (
        "fork() edits the user files only, not "
        f"{sorted(set(edits) - {'modeling.py', 'dataset.py'})}"
    )
    tree = Path(folder) / "fork"
    tree.mkdir()
    for name in ("train.py", "predict.py", "utils.py", "modeling.py", "dataset.py"):
        shutil.copy(TREE / name, tree / name)
    shutil.copytree(TREE / "core", tree / "core", ignore=shutil.ignore_patterns("__pycache__"))
    for name, changes in (edits or {}).items():
        source = (tree / name).read_text()
        for old, new in changes.items():
            assert not old or source.count(old) == 1, (
                f"{name} no longer has this text once: {old!r}"
            )
            source = source.replace(old, new) if old else source + new
        (tree / name).write_text(source)
    return tree


def launch(
    *args, processes=1, check=True, cwd=None, env=None, script="train.py", config=None, timeout=240
):
    """Runs train.py under `accelerate launch` (with configs/accelerate/CONFIG if given: 2 CPU
    processes) in `cwd` (the half's home() if None); returns the CompletedProcess (stdout + stderr
    as text)."""
    cwd = cwd or home()
    given, env = env or {}, {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(processes),
    ]
    if config:
        if Path(config).name.startswith("deepspeed"):  # not ACCELERATE_USE_CPU: it drops DeepSpeed
            env["DS_ACCELERATOR"] = "cpu"
        else:
            env["ACCELERATE_USE_CPU"] = "1"
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "configs" / "accelerate" / config),
            "--main_process_port",
            str(free_port()),
        ]
    elif processes > 1:
        # On a machine without GPUs this is what makes --multi_gpu start CPU processes over gloo.
        env["ACCELERATE_USE_CPU"] = "1"
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    env.update(given)  # the caller's variables last
    result = subprocess.run(
        command + [script, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # a hung run fails the test instead of the whole CI job
    if check and result.returncode != 0:
        raise AssertionError(
            f"train.py exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def run(*args, processes=1, check=True):
    """train.main(args) in this process when processes == 1, else launch(): a result like
    launch()'s."""
    if processes > 1:
        return launch(*args, processes=processes, check=check)
    import train

    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            train.main([str(a) for a in args])
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
            stderr.write(f"{e.code}\n" if not isinstance(e.code, int) else "")
    result = SimpleNamespace(returncode=status, stdout=stdout.getvalue(), stderr=stderr.getvalue())
    if check and status != 0:
        raise AssertionError(
            f"train.main exited {status}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


FAST = ["--batch_size", "32", "--epochs", "1"]  # 10 optimizer steps on the tiny data


def refused(argv, *fragments, main=None, one_line=True):
    """main(argv) (train.main unless given) stops with one line, "error: ...", that holds every
    fragment (one_line=False: a message that holds them, whatever its form); returns it."""
    if main is None:
        import train

        main = train.main
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    message = str(exit_info.value.code)
    assert not one_line or (message.startswith("error: ") and "\n" not in message), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def quick_run(tiny_data, tmp_path, *extra):
    """train.main() on the tiny data with FAST and EXTRA into tmp_path/model, in this process and
    with its output left to pytest's capture (capfd reads it); returns the outdir."""
    import train

    outdir = tmp_path / "model"
    train.main([*map(str, data_args(tiny_data)), *FAST, "--outdir", str(outdir), *map(str, extra)])
    return outdir


def stopped_and_resumed(args, outdir, stop, processes=1):
    """A run of ARGS stopped after STOP optimizer steps, then resumed: the resumed run's result."""
    run(*args, "--outdir", outdir, "--stop_after_steps", stop, processes=processes)
    return run("--resume", outdir / "last", processes=processes)


def python_train(*args, check=True):
    """`python train.py ARGS` in TREE, one torch thread (no accelerate launch)."""
    result = subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=TREE,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def snapshot(folder):
    """Every file's bytes, but .lock: each run that takes the lock writes its pid and start time
    there."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def finished(tiny_data, tmp_path):
    """A finished 1-epoch run in tmp_path/model."""
    outdir = tmp_path / "model"
    run(*data_args(tiny_data), *FAST, "--outdir", outdir)
    return outdir


def data_args(data):
    return ["--train_file", data / "train.jsonl", "--valid_file", data / "valid.jsonl"]


def weights(checkpoint):
    return load_file(Path(checkpoint) / "model.safetensors")


def assert_bitwise_equal(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not (wa[k].dtype == wb[k].dtype and wa[k].equal(wb[k]))]
    assert not different, (
        f"{len(different)} tensors differ between {a} and {b}, e.g. {different[:3]}"
    )


def read_json(path):
    return json.loads(Path(path).read_text())


def read_log(path):
    """log.json (or a trainer_state.json's "log") without its throughput figures: wall-clock rates
    differ from run to run, the rest of a resumed run's log is bitwise the uninterrupted one's."""
    log = read_json(path)
    log = log["log"] if "log" in log and "run_id" in log else log
    return {
        key: {part: {k: v for k, v in values.items() if not k.endswith("_per_second")}
              for part, values in entry.items()}
        for key, entry in log.items()
    }  # fmt: skip


def epochs(log):
    """The "Epoch N" entries of a log.json, in order (without the "Step N" ones)."""
    return {key: entry for key, entry in log.items() if key.startswith("Epoch ")}


STEPS_PER_EPOCH = 20  # 320 rows at a global batch of 16
SETUPS = {1: ["--batch_size", 8, "--accumulation", 2], 2: ["--batch_size", 8]}


def common_args(tiny_data, processes):
    """The runs that resume tests compare: 2 epochs, warmup, a checkpoint every 7 optimizer
    steps."""
    return [
        *data_args(tiny_data),
        "--epochs",
        2,
        "--num_warmup_steps",
        5,
        "--save_steps",
        7,
        *SETUPS[processes],
    ]


REFERENCES = {}


@pytest.fixture(scope="module")
def reference(pair, tiny_data, tmp_path_factory):
    """reference(processes): the outdir of the uninterrupted run, made once per session and half."""

    def get(processes):
        if (pair, processes) not in REFERENCES:
            folder = tmp_path_factory.mktemp(f"reference-{pair}") / str(processes)
            run(*common_args(tiny_data, processes), "--outdir", folder, processes=processes)
            REFERENCES[pair, processes] = folder
        return REFERENCES[pair, processes]

    return get


sys.path.insert(0, str(ROOT))  # core, utils (and bench, tools) import as a user's script would
# One torch thread, in this process and (chosen as a user would) in every process the tests start:
# in-process runs and CLI runs then compare bitwise.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


def tiny_tokenizer():
    """What dataset.py gives for assets/tiny-bert (a config only): a vocabulary learnt from
    data/train.jsonl."""
    import dataset
    from core import options

    return dataset.load_tokenizer(home() / "assets" / "tiny-bert", options.parse_args([]))
