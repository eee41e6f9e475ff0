"""offload_optimizer / offload_master and adamw_8bit in TrainStep, on the CPU: the offload code paths run host to
host (same chunking, same staging logic as on a GPU), so every flag alone and combined, through both offload
methods, must give exactly the losses, grad norms, weights and optimizer states of the resident run."""

import itertools

import pytest
import torch

from surogate.cli.offload import Buffer, Streamer
from surogate.cli.param_group import ParamGroup, memory_report, param_groups
from surogate.cli.step import TrainStep
from surogate.models import LoraConfig, init_model

CONFIG = dict(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100, tie_word_embeddings=True)
CHUNK = 4096  # the decay group (~80k parameters) streams in ~20 chunks; 8-bit blocks (2048) never straddle two


def micro_batches(generator, n=2, batch=2, seq=16):
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (batch, seq + 1), generator=generator)
        labels = ids[:, 1:].clone()
        labels[0, :3] = -100
        position_ids = torch.cat([torch.arange(5), torch.arange(seq - 5)]).expand(batch, seq).contiguous()
        out.append(dict(input_ids=ids[:, :-1].contiguous(), labels=labels, position_ids=position_ids))
    return out


def train(options, *, steps=4, dtype=torch.bfloat16, lora=False, data_seed=3):
    """(losses, norms, groups) of `steps` TrainSteps on a fresh tiny model (same init and data for every call)."""
    model = init_model(CONFIG, dtype=dtype, seed=1, lora=LoraConfig(rank=4, alpha=8) if lora else None)
    if lora:  # B starts at zero; move it so that A gets gradients too
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for _, p in model.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    groups = param_groups(model.trainable_parameters(), 0.1, chunk=CHUNK, **options)
    step = TrainStep(model, groups, micro_batch=2, seq_len=16, max_grad_norm=0.5)
    data = torch.Generator().manual_seed(data_seed)
    losses, norms = [], []
    for i in range(1, steps + 1):
        loss_sum, valid, norm = step(micro_batches(data), lr=3e-3, step=i)
        losses.append(loss_sum.item() / valid)
        norms.append(norm.item())
    return losses, norms, groups


def states(groups):
    return [{k: v.clone() for k, v in g.state_dict().items()} | {"work": g.work.clone()} for g in groups]


FLAGS = [dict(offload_optimizer=o, offload_master=m) for o, m in itertools.product([False, True], repeat=2)][1:]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_every_offload_combination_equals_resident(optimizer):
    base_losses, base_norms, base_groups = train(dict(optimizer=optimizer))
    base = states(base_groups)
    assert base_losses[-1] < base_losses[0]  # it trains
    for flags, method in itertools.product(FLAGS, ["zero_copy", "stream"]):
        losses, norms, groups = train(dict(optimizer=optimizer, offload_method=method, **flags))
        where = f"{optimizer} {flags} {method}"
        assert losses == base_losses and norms == base_norms, where
        if method == "stream":
            assert groups[0].streamer is not None and len(groups[0].streamer.chunks()) > 4, where
        for got, want in zip(states(groups), base, strict=True):
            assert got.keys() == want.keys(), where
            for k in want:
                assert torch.equal(got[k], want[k]), f"{where}: {k}"


def test_offload_with_lora_and_fp32_weights():
    """LoRA adapters (fp32 weights: their own master, so offload_master has nothing to move) with 8-bit states."""
    base = train(dict(optimizer="adamw_8bit"), lora=True, dtype=torch.float32)
    both = train(dict(optimizer="adamw_8bit", offload_optimizer=True, offload_master=True, offload_method="stream"),
                 lora=True, dtype=torch.float32)
    assert base[:2] == both[:2]
    assert all(not g.offload_master and g.master is g.work for g in both[2])
    for got, want in zip(states(both[2]), states(base[2]), strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_buffers_live_where_the_flags_say():
    model = init_model(CONFIG, dtype=torch.bfloat16, seed=1)
    params = [p for _, p in model.trainable_parameters() if p.dim() >= 2]
    g = ParamGroup(params, 0.1, optimizer="adamw_8bit", offload_optimizer=True, offload_method="stream", chunk=CHUNK)
    n = g.work.numel()
    assert [k for k in g.state_dict()] == ["master", "m_codes", "v_codes", "m_absmax", "v_absmax"]
    assert not g.buffers["master"].offloaded and all(g.buffers[k].offloaded for k in ("m_codes", "v_absmax"))
    assert g.buffers["m_codes"].data.dtype == torch.uint8 and g.buffers["m_absmax"].data.numel() == -(-n // 2048)
    mem, text = memory_report([g])
    assert mem["host"]["optimizer"] == 2 * n + 8 * -(-n // 2048)
    assert mem["device"]["master"] == 4 * n and mem["device"]["weights"] == 2 * n and mem["device"]["grads"] == 2 * n
    assert mem["device"]["staging"] == 2 * (2 * CHUNK + 8 * CHUNK // 2048)
    assert "pinned host: optimizer" in text and "8-bit" in text
    with pytest.raises(ValueError, match="multiple of 2048"):
        Streamer([Buffer(torch.zeros(10))], 10, torch.device("cpu"), chunk=1000)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_state_dict_resumes_exactly_across_offload_settings(optimizer):
    """Stop after 2 steps, load the state into groups with other offload flags, continue: equal to 4 steps straight."""
    straight_losses, _, straight_groups = train(dict(optimizer=optimizer), steps=4)
    model = init_model(CONFIG, dtype=torch.bfloat16, seed=1)
    first = param_groups(model.trainable_parameters(), 0.1, optimizer=optimizer, chunk=CHUNK,
                         offload_optimizer=True, offload_method="stream")
    step = TrainStep(model, first, micro_batch=2, seq_len=16, max_grad_norm=0.5)
    data = torch.Generator().manual_seed(3)
    losses = []
    for i in (1, 2):
        loss_sum, valid, _ = step(micro_batches(data), lr=3e-3, step=i)
        losses.append(loss_sum.item() / valid)
    saved = [{k: v.clone() for k, v in g.state_dict().items()} for g in first]
    model = init_model(CONFIG, dtype=torch.bfloat16, seed=1)  # a fresh process: weights from the master copies
    second = param_groups(model.trainable_parameters(), 0.1, optimizer=optimizer, chunk=CHUNK, offload_master=True,
                          offload_method="zero_copy")
    for g, s in zip(second, saved, strict=True):
        g.load_state_dict(s)
    step = TrainStep(model, second, micro_batch=2, seq_len=16, max_grad_norm=0.5)
    for i in (3, 4):
        loss_sum, valid, _ = step(micro_batches(data), lr=3e-3, step=i)
        losses.append(loss_sum.item() / valid)
    assert losses == straight_losses
    for got, want in zip(states(second), states(straight_groups), strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="missing"):
        second[0].load_state_dict({"master": saved[0]["master"]})


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_offload_on_gpu_equals_resident_in_cuda_graphs(optimizer):
    """The optimizer step alone (eager warm-up, capture, replays): zero-copy and streamed host buffers give the
    resident update's master, states and bf16 weights bit for bit, and the step is captured as a graph."""
    sizes = [(96, 130), (4097,), (77, 300), (513,)]  # ~60k parameters: several 8192-chunks, partial 8-bit blocks
    variants = [dict(), dict(offload_optimizer=True), dict(offload_master=True),
                dict(offload_optimizer=True, offload_master=True)]
    results = []
    for flags, method in [(variants[0], "zero_copy")] + [(v, m) for v in variants[1:] for m in ("zero_copy", "stream")]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to("cuda", torch.bfloat16)) for s in sizes]
        groups = param_groups([(f"p{i}", p) for i, p in enumerate(params)], 0.1, optimizer=optimizer, chunk=8192,
                              offload_method=method, **flags)
        step = TrainStep(None, groups, micro_batch=1, seq_len=1, max_grad_norm=1.0, cuda_graphs=True)
        for i in range(1, 5):
            for g in groups:
                g.grad.copy_(torch.randn(g.grad.shape, generator=gen).to("cuda", torch.bfloat16))
            step.lr.fill_(1e-2)
            step.step.fill_(i)
            step._run_optimizer()
        assert step._optimizer_graph is not None, (flags, method)
        torch.cuda.synchronize()
        results.append(((flags, method), [{k: v.cpu() for k, v in d.items()} for d in states(groups)]))
    (_, want), *others = results
    for where, got in others:
        for a, b in zip(got, want, strict=True):
            for k in b:
                assert torch.equal(a[k], b[k]), (where, k)
