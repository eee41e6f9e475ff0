"""NCCL collectives of a micro-step and an optimizer step captured in one CUDA graph, replayed with new inputs.

    mpiexec -n 2 python tests/dist/workers/graph.py

For each ZeRO level: every rank adds its own gradient (from a static input buffer refilled before each replay)
into the flat buffers group by group, marking each ready (bucket reductions launched inside the capture); an
SGD step_fn then updates the master (ZeRO-1/2 all-gather the new weights). After each replay the weights must
equal the previous ones minus lr * the mean of all ranks' gradients. Raises (and aborts the job) on a mismatch.
"""

from __future__ import annotations

import surogate.dist as sd
import torch

SIZES = [1000, 3000, 17]
LR = 0.5


def rank_grad(numel: int, rank: int, trial: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * trial + rank))


def sgd(master, grads, state, work):
    master.add_(grads, alpha=-LR)
    if work is not None:
        work.copy_(master)


def check(world: sd.World, zero: int) -> None:
    layout = sd.FlatLayout(SIZES, world.world_size, bucket_numel=0 if zero == 3 else 2048)
    start = torch.randn(layout.canonical_numel, generator=torch.Generator().manual_seed(7))
    params = layout.from_canonical(start.to(world.device))
    grads = torch.zeros_like(params) if zero < 3 else None
    dp = sd.DataParallel(world, layout, params, grads, zero=zero, make_state=lambda m: {})
    source = torch.zeros(layout.canonical_numel, device=world.device)  # refilled before each replay

    def step() -> None:
        with dp.micro_step(last=True):
            for g in reversed(range(len(SIZES))):
                dp.grad_buffer(g).add_(source[layout.canonical_span(g)])
                dp.grad_ready(g)
        dp.step(sgd)
        dp.zero_grad()

    # warm up eagerly on a side stream (NCCL communicators, allocator), then capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for trial in range(3):
        before = dp.full_master(dst=world.rank)
        source.copy_(rank_grad(layout.canonical_numel, world.rank, trial))
        graph.replay()
        torch.cuda.synchronize()
        mean = sum(rank_grad(layout.canonical_numel, r, trial) for r in range(world.world_size)) / world.world_size
        after = dp.full_master(dst=world.rank)
        torch.testing.assert_close(after, before - LR * mean, rtol=1e-5, atol=1e-5)
        if dp.params is not None:
            assert torch.equal(layout.to_canonical(dp.params).cpu(), after), f"zero={zero}: params not gathered"
    print(f"rank {world.rank}: zero={zero} graph replays match", flush=True)


def main() -> None:
    with sd.abort_on_error():
        world = sd.init("cuda")
        for zero in (0, 1, 2, 3):
            check(world, zero)
        world.barrier()
        sd.shutdown()


if __name__ == "__main__":
    main()
