"""`mpirun -n 2 surogate sft` on the CPU (gloo): 2 ranks x micro-batch b train exactly what 1 process x 2b trains.

Each 2-rank run (zero_level 0 = plain data parallel, 1, 2 and 3; full and LoRA) is compared with a 1-process run:
per-step losses and grad norms, the final weights, and (full) the gathered checkpoint of step 3. Agreement is fp32
rounding: the runs sum the batch's gradients in a different order (measured ~1.5e-6 relative on the weights after
6 AdamW steps, ~4e-8 on the losses), hence 1e-5. offload_grads (zero 2) adds the same fp32 numbers in host memory:
bit for bit the run without it. A rank that raises ends the job (zero 1 and 3) within 60 s. Each 2-rank run takes
~5 s on 2 cores; a run is shared by the tests that read it.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_mpirun = _load("dist_mpirun_helpers", TESTS / "dist" / "_mpirun.py")
_runs = _load("cli_runs_helpers", TESTS / "integration" / "cli_runs.py")

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(_mpirun.find_mpiexec() is None, reason=_mpirun.NO_MPIEXEC)]

TOL = 1e-5
SUROGATE = [sys.executable, "-m", "surogate.cli.app"]
# 6 steps x 2 micro-batches: rank r takes rows r, r + 2, ... of each step's window
BASE = {"max_steps": 6, "sequence_len": 64, "gradient_accumulation_steps": 2, "eval_steps": 0,
        "eval_exact_match_samples": 0, "logging_steps": 1, "learning_rate": 3e-3, "warmup_steps": 1}
MODES = {"full": {"lora": False}, "lora": {"lora": True, "lora_rank": 4, "lora_alpha": 8,
                                            "lora_target_modules": ["q_proj", "v_proj", "down_proj"]}}


def _mpirun_sft(config: Path, overrides: list[str], env: dict | None = None, timeout: float = 120):
    cmd = _mpirun.mpirun_command(2, [*SUROGATE, "sft", str(config), *overrides])
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return proc, time.monotonic() - start


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _weights(out: Path, mode: str) -> dict:
    file = out / "adapter" / "adapter_model.safetensors" if mode == "lora" else out / "model" / "model.safetensors"
    return {k: v.double().numpy() for k, v in load_file(file).items()}


def _steps(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """1 process x micro-batch 2, both modes; full also writes a checkpoint at step 3."""
    outs = {}
    for mode, extra in MODES.items():
        tmp = tmp_path_factory.mktemp(f"one-{mode}")
        save = {"save_steps": 3} if mode == "full" else {}
        config = _runs.write_config(tmp, per_device_train_batch_size=2, **BASE, **extra, **save)
        proc = subprocess.run([*SUROGATE, "sft", str(config)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outs[mode] = tmp / "out"
    return outs


_TWO_RANKS: dict[tuple, tuple[Path, str]] = {}


def _two_ranks(tmp_path_factory, mode: str, zero: int, offload_grads: bool = False) -> tuple[Path, str]:
    """(output_dir, output) of `mpirun -n 2 surogate sft` with micro-batch 1 (full saves at step 3), run once."""
    key = (mode, zero, offload_grads)
    if key not in _TWO_RANKS:
        tmp = tmp_path_factory.mktemp(f"two-{mode}-{zero}{'-offload' if offload_grads else ''}")
        save = {"save_steps": 3} if mode == "full" else {}
        config = _runs.write_config(tmp, per_device_train_batch_size=1, **BASE, **MODES[mode], **save)
        overrides = [f"zero_level={zero}"] + (["offload_grads=true"] if offload_grads else [])
        proc, seconds = _mpirun_sft(config, overrides)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"({seconds:.1f} s)\n{output}"
        _TWO_RANKS[key] = (tmp / "out", output)
    return _TWO_RANKS[key]


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_equal_one_process_with_twice_the_micro_batch(tmp_path_factory, one_process, mode, zero):
    out, output = _two_ranks(tmp_path_factory, mode, zero)
    save = mode == "full"
    assert f"data parallel: 2 processes on 1 node(s), gloo, zero_level {zero}" in output
    assert output.count("step      6/6") == 1, output  # rank 0 alone prints
    got, want = _steps(out), _steps(one_process[mode])
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["trained_tokens"] for r in got] == [r["trained_tokens"] for r in want]  # global token counts
    assert _rel([r["loss"] for r in got], [r["loss"] for r in want]) < TOL
    assert _rel([r["grad_norm"] for r in got], [r["grad_norm"] for r in want]) < TOL
    a, b = _weights(out, mode), _weights(one_process[mode], mode)
    assert sorted(a) == sorted(b)
    for k in b:
        assert _rel(a[k], b[k]) < TOL, k
    if save:  # the checkpoint holds the full (gathered) optimizer state, as one process writes it
        name = "checkpoints/step_00000003/optimizer.safetensors"
        ca, cb = load_file(out / name), load_file(one_process[mode] / name)
        assert sorted(ca) == sorted(cb)
        for k in cb:
            assert _rel(ca[k].double().numpy(), cb[k].double().numpy()) < TOL, k
    # the run trained: the loss fell well beyond the tolerance
    assert got[-1]["loss"] < got[0]["loss"] - 0.1


def _line(output: str, start: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(start))


def test_offload_grads_at_zero_2_equals_the_run_without(tmp_path_factory):
    out, output = _two_ranks(tmp_path_factory, "full", 2, offload_grads=True)
    assert "gradient shards in host memory (offload_grads)" in output, output
    plain, plain_output = _two_ranks(tmp_path_factory, "full", 2)
    # the per-rank memory line: the fp32 gradient shard moved from the device to pinned host memory
    offloaded, resident = (_line(o, "per rank, sharded: ") for o in (output, plain_output))
    shard = re.search(r"device: .*grad shard ([\d.]+ MiB)", resident).group(1)
    assert "grad shard" not in offloaded.split("pinned host")[0] and f"pinned host: grad shard {shard}" in offloaded
    assert [(r["loss"], r["grad_norm"]) for r in _steps(out)] == [(r["loss"], r["grad_norm"]) for r in _steps(plain)]
    a, b = _weights(out, "full"), _weights(plain, "full")
    for k in b:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("zero", [1, 3])
def test_a_failing_rank_ends_the_job_naming_it(tmp_path, zero):
    config = _runs.write_config(tmp_path, per_device_train_batch_size=1, **BASE)
    proc, seconds = _mpirun_sft(config, [f"zero_level={zero}"], env={"SUROGATE_TEST_FAIL_RANK": "1"}, timeout=90)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert seconds < 60, f"the job took {seconds:.0f} s to end"
    assert "rank 1 failed: RuntimeError: SUROGATE_TEST_FAIL_RANK=1" in output, output
    assert "step      6/6" not in output


def test_a_user_error_on_every_rank_exits_2(tmp_path):
    config = _runs.write_config(tmp_path, per_device_train_batch_size=1, **BASE)
    proc, _ = _mpirun_sft(config, ["offload_grads=true", "zero_level=3"], timeout=90)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    if _mpirun.mpi_flavor(_mpirun.find_mpiexec()) == "mpich":  # hydra returns the Abort code: a user error's 2
        assert proc.returncode == 2, output
    assert "offload_grads: true with zero_level 3" in output and "zero_level: 2 under mpirun" in output, output


def test_two_ranks_resume_from_their_checkpoint_and_refuse_another_world_size(tmp_path, one_process):
    config = _runs.write_config(tmp_path, per_device_train_batch_size=1, save_steps=3, **BASE)
    proc, _ = _mpirun_sft(config, [], env={"SUROGATE_TEST_INTERRUPT_AFTER_STEP": "3"})
    assert proc.returncode == 130, proc.stdout + proc.stderr  # Ctrl-C's code, on every rank
    proc, _ = _mpirun_sft(config, ["resume_from_checkpoint=true"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "resumed from" in output, output
    a, b = _weights(tmp_path / "out", "full"), _weights(one_process["full"], "full")
    for k in b:
        assert _rel(a[k], b[k]) < TOL, k
    # one process reads the rows in another order: its resume is refused, naming the key
    one = subprocess.run([*SUROGATE, "sft", str(config), "resume_from_checkpoint=true", "max_steps=7"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 2 and "world_size was 2" in one.stderr, one.stdout + one.stderr
