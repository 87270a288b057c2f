"""The checks that need NVIDIA GPUs, in one command: mixed precision, an fp16 overflow, DDP,
FSDP2 and DeepSpeed ZeRO-3 (bf16; and ZeRO-2 with its optimizer offloaded to the CPU, whose CPU
Adam compiles at start: minutes) on 2 GPUs, --torch_compile; samples/s and peak GPU memory per
case. Never run by this project's CI (it has no GPU): run it on any machine with 1 to 8 GPUs after
an upgrade.

    python tools/gpu_check.py            # prints one line per case, exits 1 if any failed

Without CUDA it prints one line and exits 0. Each case trains the shipped task (600 training lines,
2 epochs) in a temporary folder; the stop/resume cases (fp16 on 1 GPU, with its loss scale in
scaler.pt; DDP and DeepSpeed ZeRO-3 on 2) compare the final weights with the run that was never
stopped, bitwise: the same GPUs, the same launch. Never run yet: no GPU was lent to the sessions
that wrote the fp16 and the DeepSpeed cases.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys, runpy, torch
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    if torch.cuda.is_available():
        print(f"PEAK_MEMORY_MIB {torch.cuda.max_memory_allocated() / 2**20:.0f}", flush=True)
"""


def launch(args, processes=1, config=None, env=None):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
    ]
    command += (
        ["--config_file", str(ROOT / "configs" / "accelerate" / config)]
        if config
        else ["--num_processes", str(processes), *(["--multi_gpu"] if processes > 1 else [])]
    )
    start = time.perf_counter()
    probe = Path(tempfile.gettempdir()) / "gpu_check_probe.py"  # train.py, then its peak GPU memory
    result = subprocess.run(
        [*command, str(probe), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return result, time.perf_counter() - start


def main():
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing was checked.")
        return 0
    (Path(tempfile.gettempdir()) / "gpu_check_probe.py").write_text(PROBE)
    gpus = torch.cuda.device_count()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    lines = (ROOT / "data" / "train.jsonl").read_text().splitlines()[:600]
    (work / "train.jsonl").write_text("\n".join(lines) + "\n")
    base = [
        "--train_file",
        work / "train.jsonl",
        "--epochs",
        2,
        "--batch_size",
        16,
        "--save_steps",
        13,
    ]
    cases = [
        ("bf16, 1 GPU", dict(args=["--mixed_precision", "bf16"])),
        (
            "fp16 with an overflow (lr 1e30), 1 GPU",
            dict(args=["--mixed_precision", "fp16", "--lr", "1e30"], expect_failure="non-finite"),
        ),
        # the loss scale continues (scaler.pt): bitwise the run that was never stopped
        (
            "fp16, 1 GPU, stopped at step 20 and resumed",
            dict(args=["--mixed_precision", "fp16"], resume=20),
        ),
        ("--torch_compile, 1 GPU", dict(args=["--torch_compile"])),
    ]
    if gpus >= 2:
        cases += [
            ("DDP, 2 GPUs, stopped at step 20 and resumed", dict(args=[], processes=2, resume=20)),
            (
                "FSDP2, 2 GPUs",
                dict(args=[], config="fsdp.yaml", env={"ACCELERATE_NUM_PROCESSES": "2"}),
            ),
        ]
    if gpus >= 2 and importlib.util.find_spec("deepspeed"):  # pip install deepspeed
        offload = work / "deepspeed_zero2_offload.yaml"  # the CPU Adam of offload compiles here
        offload.write_text(
            (ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml")
            .read_text()
            .replace("offload_optimizer_device: none", "offload_optimizer_device: cpu")
        )
        two = {"ACCELERATE_NUM_PROCESSES": "2"}
        cases += [
            (
                "DeepSpeed ZeRO-3 bf16, 2 GPUs, stopped at step 20 and resumed",
                dict(args=[], config="deepspeed_zero3.yaml", env=two, resume=20),
            ),
            (
                "DeepSpeed ZeRO-2, optimizer offloaded to the CPU, 2 GPUs",
                dict(args=[], config=offload, env=two),
            ),
        ]
    failed = 0
    for name, case in cases:
        outdir = work / name.split(",")[0].replace(" ", "_")
        args = [*base, *case["args"], "--outdir", outdir]
        result, seconds = launch(
            args, case.get("processes", 1), case.get("config"), case.get("env")
        )
        ok = (
            (case.get("expect_failure", "") in result.stderr)
            if "expect_failure" in case
            else result.returncode == 0
        )
        if ok and case.get("resume"):
            stopped = work / "stopped"
            shutil.rmtree(stopped, ignore_errors=True)
            processes = case.get("processes", 1)
            config, env = case.get("config"), case.get("env")
            launch(
                [*base, *case["args"], "--outdir", stopped, "--stop_after_steps", case["resume"]],
                processes,
                config,
                env,
            )
            launch(["--resume", stopped / "last"], processes, config, env)
            ok = (stopped / "last" / "model.safetensors").read_bytes() == (
                outdir / "last" / "model.safetensors"
            ).read_bytes()
            ok = ok and ("fp16" not in case["args"] or (stopped / "last" / "scaler.pt").is_file())
        peak = [
            line.split()[1]
            for line in result.stdout.splitlines()
            if line.startswith("PEAK_MEMORY_MIB")
        ]
        steps = (
            json.loads((outdir / "last" / "trainer_state.json").read_text())["global_step"]
            if (outdir / "last").exists()
            else 0
        )
        rate = steps * 16 * case.get("processes", 1) / seconds
        print(
            f"{'PASS' if ok else 'FAIL'}  {name}: {rate:.0f} samples/s "
            f"(whole process), peak GPU memory {'/'.join(peak) or '?'} MiB"
        )
        if not ok:
            failed += 1
            print(result.stderr[-2000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
