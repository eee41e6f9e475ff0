"""Two GPUs with NCCL (`pytest tests/dist -m "gpu and mpi"` on a 2-GPU machine): the CPU equivalence suite on
CUDA, collectives inside a captured CUDA graph, and a failing rank ending an NCCL job."""

import numpy as np
import pytest
import surogate.dist as sd
import torch
from _mpirun import NO_MPIEXEC, find_mpiexec, run_worker
from test_dist_mpi import CHECKPOINTS, OFFLOADED, assert_offload_is_bit_for_bit, eq, rel, rtol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.mpi,
    pytest.mark.skipif(find_mpiexec() is None, reason=NO_MPIEXEC),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}  # NVLink multicast stays off on the shared machines


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_gpu")
    args = ["--out", str(out), "--device", "cuda", "--checkpoints", *CHECKPOINTS]
    proc, seconds = run_worker(2, "equivalence.py", args, timeout=300, env=NCCL_ENV)
    assert proc.returncode == 0, f"mpirun failed ({seconds:.1f} s):\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def one_gpu():
    world = sd.init("cuda")
    results = {config: eq.train(world, config) for config in eq.CONFIGS}
    sd.shutdown()
    return results


@pytest.mark.parametrize("config", eq.CONFIGS)
def test_two_gpus_equal_one_gpu_with_twice_the_batch(two_gpus, one_gpu, config):
    got, want = np.load(two_gpus / f"{config}.npz"), one_gpu[config]
    tol = rtol(config)
    assert rel(got["losses"], want["losses"]) < tol, (got["losses"], want["losses"])
    assert rel(got["norms"], want["norms"]) < tol
    assert rel(got["final"], want["final"]) < tol


@pytest.mark.parametrize("config", OFFLOADED)
def test_offload_grads_is_bit_for_bit_the_device_shard_on_gpus(two_gpus, one_gpu, config):
    assert_offload_is_bit_for_bit(config, two_gpus, one_gpu)


def test_collectives_replay_inside_a_cuda_graph():
    proc, seconds = run_worker(2, "graph.py", [], timeout=300, env=NCCL_ENV)
    assert proc.returncode == 0, f"({seconds:.1f} s)\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.count("graph replays match") == 8, proc.stdout


def test_a_failing_rank_ends_an_nccl_job():
    proc, seconds = run_worker(2, "fail.py", ["--mode", "raise", "--device", "cuda"], timeout=120, env=NCCL_ENV)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and seconds < 60, output
    assert "rank 1 failed: ValueError" in output and "passed the collective" not in output, output


def test_sharded_embedding_lookup_and_gradient_with_nccl():
    proc, seconds = run_worker(2, "sharded_table.py", ["--device", "cuda"], timeout=120, env=NCCL_ENV)
    assert proc.returncode == 0, f"({seconds:.1f} s)\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.count("sharded table ok") == 2, proc.stdout

