"""Train and score every distilled student of the embedded teacher on a GPU, within a time budget, resumably.

    python benchmarks/gpu_students.py --runs RUNS --minutes 8 [--out OUT] [--jobs NAME ...] [--scale S]
        [--dry-run]

Each job is ``fewstep distill`` on a config of ``configs/distill/`` with GPU-sized overrides (batch 256,
longer runs than the CPU configs; see ``JOBS``), its ``train.output_dir`` under ``RUNS/<name>``. The
unfinished jobs share the budget; a job still running at its share's end gets SIGTERM, which the training
core turns into a checkpoint, so the next call (same ``RUNS``) continues it. The finished students are
scored with ``benchmarks/teacher_fd.py`` (FD-fmnist, N = 1000, seed 0) beside the teacher's DDIM and
DPM-Solver++ at their NFE.

With ``--out`` (the device tool's ``$OUT``, which brings back at most 8 files of 16 MiB) it writes
``students.tar`` (every exported student), ``fd_students.txt`` (the table), ``gpu_log.txt`` and one
``resume-<job>.tar`` per unfinished job (its newest checkpoint), as many as fit; untar those into ``RUNS``
and call again to go on. ``--scale 0.001`` shrinks every run (a CPU check of the mechanics).

On the lent H200 machine (no diffusers / torch-fidelity there): download their wheels into an ignored
``.whl/`` folder as the device notes say, copy Debian's Fashion-MNIST folder into an ignored
``.gpu_data/fashion-mnist`` and run, carrying ``.whl`` and ``.gpu_data`` (the copy puts the data where
``fewstep.data`` looks for it, as on a Debian machine with ``dataset-fashion-mnist``)::

    mkdir -p /usr/share/datasets && cp -r .gpu_data/fashion-mnist /usr/share/datasets/
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 python3 \
        benchmarks/gpu_students.py --runs /tmp/runs --minutes 8 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: name -> (config, overrides). Larger batches and 4-8x the CPU configs' updates; PD starts at 64 steps.
JOBS: dict[str, tuple[str, list[str]]] = {
    "progressive": ("configs/distill/progressive_fmnist.yaml",
                    ["progressive.start_steps=64", "train.steps=24000", "train.batch_size=256"]),
    **{f"consistency-{s}": ("configs/distill/consistency_fmnist.yaml",
                            [f"consistency.student_steps={s}", "train.steps=10000", "consistency.anneal_updates=8000",
                             "train.batch_size=256"]) for s in (1, 2, 4, 8)},
    # one-step distribution matching from the committed PD one-step student (the CPU runs' start)
    "fdistill": ("configs/distill/fdistill_fmnist.yaml", ["train.steps=20000", "train.batch_size=128"]),
    "sim": ("configs/distill/sim_fmnist.yaml", ["train.steps=10000", "train.batch_size=128",
                                                "sim.generator_init=teachers/fmnist_students/progressive-1"]),
}
#: Files the device tool brings back (8 at most, 16 MiB each).
MAX_FILES, MAX_BYTES = 8, 16 * 2 ** 20
STEP_KEYS = ("train.steps", "consistency.anneal_updates")


def scaled(overrides: list[str], scale: float) -> list[str]:
    """The job's overrides with its step counts multiplied by ``scale`` (at least 1)."""
    out = []
    for item in overrides:
        key, value = item.split("=", 1)
        if key in STEP_KEYS:
            value = str(max(1, math.ceil(int(value) * scale)))
        out.append(f"{key}={value}")
    return out


def job_command(name: str, runs: Path, scale: float) -> list[str]:
    config, overrides = JOBS[name]
    command = [sys.executable, "-m", "fewstep.cli", "distill", "--config", str(REPO / config),
               *scaled(overrides, scale), f"train.output_dir={runs / name}", "train.progress=false"]
    if scale < 1:
        # Small runs still need a checkpoint, a log line and (PD) a round of at least one step each.
        command += ["train.checkpoint_every=1", "train.log_every=1"]
    return command


def finished(runs: Path, name: str) -> bool:
    return (runs / name / "done.json").is_file()


def run_job(command: list[str], seconds: float, log) -> str:
    """Run one job until it ends or its share of the budget is spent (then SIGTERM: the core checkpoints)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        return "finished" if process.wait(timeout=max(seconds, 1.0)) == 0 else f"failed ({process.returncode})"
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.wait()
        return "paused (checkpoint saved)"


def students_of(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.glob("*/students/*/fewstep_student.json"))


def newest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("checkpoint-*.pt"))
    return found[-1] if found else None


def pack(runs: Path, out: Path, pending: list[str]) -> list[str]:
    """Students in one tar, then one resume tar per unfinished job while the device tool's limits allow."""
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    with tarfile.open(out / "students.tar", "w") as tar:
        for student in students_of(runs):
            tar.add(student, arcname=str(student.relative_to(runs)))
    files = len(list(out.iterdir()))
    for name in pending:
        checkpoint = newest_checkpoint(runs / name)
        if checkpoint is None:
            continue
        if files >= MAX_FILES or checkpoint.stat().st_size > MAX_BYTES:
            notes.append(f"{name}: checkpoint {checkpoint.name} not brought back (device tool limits)")
            continue
        with tarfile.open(out / f"resume-{name}.tar", "w") as tar:
            tar.add(checkpoint, arcname=f"{name}/{checkpoint.name}")
        files += 1
    return notes


def score(students: list[Path], log, out: Path | None) -> None:
    steps = sorted({json.loads((s / "fewstep_student.json").read_text())["steps"] for s in students})
    command = [sys.executable, str(REPO / "benchmarks/teacher_fd.py"), "--nfe", *map(str, steps), "50",
               "--students", *map(str, students)]
    table = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True).stdout
    print(table)
    if out is not None:
        (out / "fd_students.txt").write_text(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, type=Path, help="folder of the jobs' output_dirs (kept across calls)")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget for training, all jobs together")
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    p.add_argument("--scale", type=float, default=1.0, help="multiply every job's steps (e.g. 0.001 on a CPU)")
    p.add_argument("--out", type=Path, default=None, help="write students.tar, resume tars and the table here")
    p.add_argument("--no-score", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = p.parse_args(argv)
    if not args.scale > 0 or not args.minutes > 0:
        p.error("--scale and --minutes must be > 0")

    args.runs.mkdir(parents=True, exist_ok=True)
    pending = [name for name in args.jobs if not finished(args.runs, name)]
    if args.dry_run:
        for name in pending:
            print(" ".join(job_command(name, args.runs, args.scale)))
        return 0
    log_path = (args.out or args.runs) / "gpu_log.txt"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    with open(log_path, "a") as log:
        for i, name in enumerate(pending):
            share = (deadline - time.monotonic()) / (len(pending) - i)
            start = time.monotonic()
            status = run_job(job_command(name, args.runs, args.scale), share, log)
            if status == "finished":
                (args.runs / name / "done.json").write_text(json.dumps({"seconds": time.monotonic() - start}))
            print(f"{name}: {status} after {time.monotonic() - start:.0f} s", flush=True)
        left = [name for name in args.jobs if not finished(args.runs, name)]
        students = students_of(args.runs)
        if students and not args.no_score:
            score(students, log, args.out)
        if args.out is not None:
            for note in pack(args.runs, args.out, left):
                print(note)
    print(f"unfinished: {', '.join(left) or 'none'}; log {log_path}")
    return 0 if not left else 3


if __name__ == "__main__":
    raise SystemExit(main())
