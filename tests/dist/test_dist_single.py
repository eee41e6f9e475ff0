"""World size 1 (no mpirun): no MPI import, no process group; engine misuse errors; checkpoint files."""

import json
import os
import subprocess
import sys

import pytest
import surogate.dist as sd
import torch
from surogate.dist import _safetensors

MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def world():
    w = sd.init("cpu")
    yield w
    sd.shutdown()


def adam_state(master):
    return {"exp_avg": torch.zeros_like(master), "exp_avg_sq": torch.zeros_like(master)}


def test_plain_run_is_world_size_one_without_mpi():
    code = (
        "import sys, torch.distributed as tdist, surogate.dist as sd\n"
        "w = sd.init()\n"
        "assert (w.rank, w.world_size, w.local_rank, w.local_size, w.node_count, w.nodes) == (0, 1, 0, 1, 1, 1), w\n"
        "assert w.is_main and w.backend is None and not tdist.is_initialized()\n"
        "assert sd.init() is w\n"
        "assert w.mean(3.0) == 3.0 and w.sum(2) == 2.0 and w.local_slice(6) == slice(0, 6)\n"
        "assert 'mpi4py' not in sys.modules, 'a plain run imported mpi4py'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in MPI_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(sd.DistError, match="no CUDA GPU"):
        sd.world._pick_device("cuda", 0, 1)


def test_too_many_ranks_per_node_names_the_gpu_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(sd.DistError, match="4 ranks run on this node but only 2 GPU"):
        sd.world._pick_device("cuda", 3, 4)


def test_local_slice_needs_a_multiple_of_the_world_size():
    w = sd.World(1, 2, 1, 2, 1, torch.device("cpu"), "gloo", False)
    assert w.local_slice(8) == slice(4, 8)
    with pytest.raises(sd.DistError, match="does not split over 2 ranks"):
        w.local_slice(7)


def test_abort_on_error_reraises_outside_mpi(monkeypatch):
    for name in MPI_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="boom"), sd.abort_on_error():
        raise ValueError("boom")


def make(world, zero, sizes=(10, 0, 33), bucket_numel=16, dtype=torch.float32):
    layout = sd.FlatLayout(list(sizes), world.world_size, bucket_numel=bucket_numel)
    params = layout.from_canonical(torch.randn(layout.canonical_numel).to(dtype))
    grads = torch.zeros_like(params) if zero < 3 else None
    return sd.DataParallel(world, layout, params, grads, zero=zero, make_state=adam_state)


def test_engine_misuse_is_reported(world):
    layout = sd.FlatLayout([10, 33], 1)
    params = torch.zeros(layout.numel)
    with pytest.raises(ValueError, match="zero must be"):
        sd.DataParallel(world, layout, params, params.clone(), zero=4, make_state=adam_state)
    with pytest.raises(ValueError, match="needs the flat gradient buffer"):
        sd.DataParallel(world, layout, params, None, zero=1, make_state=adam_state)
    with pytest.raises(ValueError, match="grads=None"):
        sd.DataParallel(world, layout, params, params.clone(), zero=3, make_state=adam_state)
    with pytest.raises(ValueError, match="layout needs a flat"):
        sd.DataParallel(world, layout, params[:-1], params.clone(), zero=0, make_state=adam_state)
    with pytest.raises(ValueError, match="layout is for 2 ranks"):
        sd.DataParallel(world, sd.FlatLayout([10], 2), params, params.clone(), make_state=adam_state)

    dp = make(world, 3)
    with pytest.raises(RuntimeError, match="inside `with dp.micro_step"):
        dp.grad_buffer(0)
    with dp.micro_step():
        dp.grad_buffer(0).add_(1.0)
        dp.grad_ready(0)
        with pytest.raises(RuntimeError, match="marked ready twice"):
            dp.grad_ready(0)
    with pytest.raises(RuntimeError, match="inside `with dp.micro_step"):
        dp.grad_ready(0)


def sgd(master, grads, state, work):
    master.add_(grads.float(), alpha=-0.1)
    if work is not None:
        work.copy_(master)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_step_updates_what_the_model_reads(world, zero, dtype, generator):
    """One micro-step with a known gradient and an SGD step_fn: the weights move by -lr * grad at every level;
    with bf16 weights the model reads the new fp32 master rounded to bf16."""
    dp = make(world, zero, dtype=dtype)
    before = dp.full_master()
    assert torch.equal(torch.cat([dp.gather(g) for g in range(3)]), before.to(dtype))
    grad = torch.randn(before.numel(), generator=generator)
    with dp.micro_step():
        for g in reversed(range(3)):
            dp.grad_buffer(g).add_(grad[dp.layout.canonical_span(g)])
            dp.grad_ready(g)
    grad = grad.to(dtype).float()  # every level accumulates in the weights' dtype (ZeRO-3: its scratch)
    torch.testing.assert_close(dp.grad_norm(), torch.linalg.vector_norm(grad))
    dp.step(sgd)
    torch.testing.assert_close(dp.full_master(), before - 0.1 * grad, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([dp.gather(g) for g in range(3)]), dp.full_master().to(dtype))
    dp.zero_grad()
    assert dp.grad_norm().item() == 0.0


def test_rank_checkpoint_needs_the_same_zero_level(world, tmp_path):
    dp = make(world, 1)
    dp.save_state(tmp_path, gathered=False)
    assert (tmp_path / "rank0.safetensors").exists()
    with pytest.raises(sd.DistError, match="saved at ZeRO level 1, this run uses 2"):
        make(world, 2).load_state(tmp_path)
    with pytest.raises(sd.DistError, match="holds no optimizer state"):
        make(world, 1).load_state(tmp_path / "missing")


def test_gathered_checkpoint_needs_the_same_groups(world, tmp_path):
    dp = make(world, 2)
    dp.save_state(tmp_path)
    with pytest.raises(sd.DistError, match="parameter groups of sizes"):
        make(world, 0, sizes=(10, 0, 34)).load_state(tmp_path)
    other = make(world, 3, bucket_numel=0)  # another level and bucket size: the gathered form still loads
    other.load_state(tmp_path)
    torch.testing.assert_close(other.full_master(), dp.full_master(), rtol=0, atol=0)


def test_safetensors_files_match_the_library(tmp_path, generator):
    st = pytest.importorskip("safetensors.torch")
    tensors = {
        "a": torch.randn(3, 5, generator=generator),
        "b": torch.randn(7, generator=generator).bfloat16(),
        "c": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(2.5),
    }
    ours = tmp_path / "ours.safetensors"
    _safetensors.save_file(tensors, ours, {"k": "v"})
    theirs = st.load_file(str(ours))
    assert set(theirs) == set(tensors) and all(torch.equal(theirs[k], tensors[k]) for k in tensors)

    lib = tmp_path / "lib.safetensors"
    st.save_file(tensors, str(lib), metadata={"x": json.dumps([1, 2])})
    back, meta = _safetensors.load_file(lib)
    assert meta == {"x": "[1, 2]"}
    assert all(back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]) for k in tensors)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lib.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _safetensors.load_file(truncated)


def test_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv("SUROGATE_DIST_TIMEOUT", "1800")
    assert sd.world._env_timeout().total_seconds() == 1800
    monkeypatch.delenv("SUROGATE_DIST_TIMEOUT")
    assert sd.world._env_timeout() == sd.DEFAULT_TIMEOUT
    monkeypatch.setenv("SUROGATE_DIST_TIMEOUT", "ten minutes")
    with pytest.raises(sd.DistError, match="in seconds"):
        sd.world._env_timeout()


@pytest.mark.parametrize("zero", [1, 3])
def test_accumulate_grad_copies_first_and_zeroes_what_it_never_wrote(world, zero, generator, monkeypatch):
    """accumulate_grad into parts of a group: written spans hold the sum of their grads, the rest reduces to 0. At
    zero 3 the scratch is uninitialised (here: NaN) until written, so a span it forgot to zero would poison the
    gradient shard."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    dp = make(world, zero, sizes=(10, 0, 33), bucket_numel=0)
    a, b = torch.randn(5, 2, generator=generator).t(), torch.randn(7, generator=generator)  # a: strided [2, 5]
    with dp.micro_step():
        dp.accumulate_grad(2, 4, a)  # elements 4..13 of group 2, twice (the second use adds)
        dp.accumulate_grad(2, 4, a)
        dp.accumulate_grad(2, 20, b)  # elements 20..26; 0..3, 14..19 and 27..32 are never written
        for g in (2, 1, 0):
            dp.grad_ready(g)
    want = torch.zeros(33)
    want[4:14] = 2 * a.reshape(-1)
    want[20:27] = b
    got = dp._reduced_shard() if zero else dp.grads
    span = dp.layout.buckets[dp.layout.group_bucket[2]].shard_span
    torch.testing.assert_close(got[span][:33], want, rtol=0, atol=1e-6)
    assert got[span][33:].eq(0).all()  # the bucket's padding
    assert got[dp.layout.buckets[dp.layout.group_bucket[0]].shard_span].eq(0).all()  # a group with no gradient
