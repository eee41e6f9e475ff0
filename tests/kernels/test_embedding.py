import pytest
import torch
import torch.nn.functional as F

from surogate.kernels import embedding_backward, embedding_forward
from surogate.kernels.ops import embedding
from surogate.kernels.testing import assert_close, randn
from surogate.kernels.torch import Embedding


def float64_truth(ids, table, dy):
    """Lookup and d(table) by float64 autograd of F.embedding."""
    t = table.double().requires_grad_()
    out = F.embedding(ids.long(), t)
    out.backward(dy.double())
    return out.detach(), t.grad


def inputs(n_tokens, vocab, dim, dtype, generator, device="cpu"):
    table = randn(vocab, dim, dtype=dtype, generator=generator).to(device)
    # repeated ids (a few hot ones), some vocabulary rows never used
    ids = torch.randint(0, vocab, (n_tokens,), generator=generator)
    ids[: n_tokens // 3] = ids[0]
    ids = ids[torch.randperm(n_tokens, generator=generator)]
    dy = randn(n_tokens, dim, dtype=dtype, generator=generator).to(device)
    return ids.to(device), table, dy


def check(fwd, bwd, n_tokens, vocab, dim, dtype, generator, device="cpu", out_dtype=None):
    ids, table, dy = inputs(n_tokens, vocab, dim, dtype, generator, device)
    out = fwd(ids.reshape(2, -1) if n_tokens % 2 == 0 else ids, table)
    dtable = bwd(dy, ids, vocab, out_dtype)
    out64, dtable64 = float64_truth(ids.cpu(), table.cpu(), dy.cpu())
    assert torch.equal(out.reshape(-1, dim).cpu(), table.cpu()[ids.cpu()])  # a copy: bit exact
    assert_close(out.reshape(-1, dim), out64, dtype, "out")
    assert dtable.dtype == (out_dtype or dtype)
    # sums of up to n_tokens / 3 rows in fp32, rounded once to the output dtype
    assert_close(dtable, dtable64, out_dtype or dtype, "dtable")


SHAPES = [(7, 5, 3), (40, 50, 24), (64, 1000, 100), (33, 17, 4099)]


@pytest.mark.parametrize("n_tokens,vocab,dim", SHAPES)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.bfloat16, torch.float32)])
def test_reference_matches_float64(n_tokens, vocab, dim, dtype, out_dtype, generator):
    check(embedding.reference_forward, embedding.reference_backward, n_tokens, vocab, dim, dtype, generator,
          out_dtype=out_dtype)


def test_module_matches_float64_autograd(generator):
    ids, table, dy = inputs(12, 20, 8, torch.float32, generator)
    module = Embedding(20, 8)
    with torch.no_grad():
        module.weight.copy_(table)
    out = module(ids.reshape(3, 4))
    out.backward(dy.reshape(3, 4, 8))
    out64, dtable64 = float64_truth(ids, table, dy)
    assert_close(out.reshape(12, 8), out64, torch.float32, "out")
    assert_close(module.weight.grad, dtable64, torch.float32, "dtable")


def test_public_functions_reject_mismatched_shapes(generator):
    ids, table, dy = inputs(6, 10, 4, torch.float32, generator)
    with pytest.raises(IndexError):
        embedding_forward(torch.tensor([10]), table)  # out of range on the CPU path
    with pytest.raises(ValueError, match="one row per id"):
        embedding_backward(dy[:5], ids, 10)


@pytest.mark.sim
@pytest.mark.parametrize("n_tokens,vocab,dim", [(12, 40, 8), (9, 37, 5)])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.bfloat16, torch.float32)])
def test_kernel_in_simulator(n_tokens, vocab, dim, dtype, out_dtype, generator):
    check(embedding.forward, embedding.backward, n_tokens, vocab, dim, dtype, generator, out_dtype=out_dtype)


@pytest.mark.sim
def test_kernel_out_of_range_ids_in_simulator(generator):
    ids, table, dy = inputs(4, 10, 6, torch.bfloat16, generator)
    ids[1] = 10
    ids[2] = -1
    out = embedding.forward(ids, table)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert torch.equal(out[0], table[ids[0]])
    dtable = embedding.backward(dy.float(), ids, 10)
    expected = torch.zeros(10, 6)
    expected.index_add_(0, ids[[0, 3]], dy[[0, 3]].float())
    assert_close(dtable, expected, torch.float32, "dtable (out-of-range ids ignored)")


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [1024, 2048, 2560, 4096, 4099])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                             (torch.float32, None)])
def test_kernel_on_gpu(dim, dtype, out_dtype, generator):
    check(embedding_forward, embedding_backward, 4096, 151936, dim, dtype, generator, device="cuda",
          out_dtype=out_dtype)


@pytest.mark.gpu
def test_backward_is_deterministic_on_gpu(generator):
    ids, table, dy = inputs(4096, 151936, 2048, torch.bfloat16, generator, device="cuda")
    first = embedding_backward(dy, ids, 151936, torch.float32)
    assert all(torch.equal(first, embedding_backward(dy, ids, 151936, torch.float32)) for _ in range(3))
