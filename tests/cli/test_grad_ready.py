"""GradReadiness (a parameter's gradient is reported once it is complete, tied weights included) and zero 0's
bucketed all-reduce launched from it while backward is still running (single process: the collective recorded)."""

import pytest
import torch

import surogate.dist._comm as comm
from surogate.cli.data_parallel_step import AllReduceBuckets
from surogate.cli.grad_ready import GradReadiness
from surogate.cli.param_group import param_groups
from surogate.models import LoraConfig, init_model

CONFIG = dict(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100, tie_word_embeddings=True)


def _batch(generator):
    ids = torch.randint(0, 100, (2, 17), generator=generator)
    return ids[:, :-1], ids[:, 1:], torch.arange(16).expand(2, 16)


def _backward(model, batch):
    loss, _ = model.loss_sum(*batch)
    loss.backward()


@pytest.mark.parametrize("lora", [False, True])
def test_each_gradient_is_reported_once_and_complete(lora, generator):
    """Every trainable parameter is reported once, and at the moment of its report its gradient already equals its
    final value of the micro-step (the tied embedding too: autograd sums its lm_head and lookup gradients first)."""
    model = init_model(CONFIG, dtype=torch.float32, seed=1, lora=LoraConfig(rank=4, alpha=8) if lora else None)
    params = [p for _, p in model.trainable_parameters()]
    at_report = {}
    readiness = GradReadiness(params, lambda p: at_report.setdefault(id(p), p.grad.clone()))
    with readiness.micro_step(report=True):  # the first micro-step learns the counts: no reports
        _backward(model, _batch(generator))
    assert at_report == {} and set(readiness.expected.values()) == {1}
    for p in params:
        p.grad = None
    with readiness.micro_step(report=True):
        _backward(model, _batch(generator))
    assert set(at_report) == {id(p) for p in params}
    for p in params:
        assert torch.equal(at_report[id(p)], p.grad)
    at_report.clear()
    with readiness.micro_step(report=False):  # accumulation micro-steps of a window: counted, not reported
        _backward(model, _batch(generator))
    assert at_report == {}
    readiness.remove()


def test_zero0_buckets_launch_during_backward(generator, monkeypatch):
    """Spans of whole parameters covering each flat gradient buffer from its end; on a micro-step after the first,
    the first span is all-reduced while the embedding's gradient is still being computed (overlap), every span
    exactly once, and finish() waits for all."""
    model = init_model(CONFIG, dtype=torch.float32, seed=1)
    groups = param_groups(model.trainable_parameters(), 0.1)
    embed = model.model.embed_tokens.weight
    world = type("World", (), {"world_size": 2})()
    buckets = AllReduceBuckets(world, groups, bucket_numel=20_000)
    for g in groups:  # the spans tile the buffer, last parameters first
        mine = [s for s in buckets.spans if s.data_ptr() >= g.grad.data_ptr()
                and s.data_ptr() < g.grad.data_ptr() + g.grad.numel() * g.grad.element_size()]
        offsets = [(s.data_ptr() - g.grad.data_ptr()) // g.grad.element_size() for s in mine]
        assert offsets == sorted(offsets, reverse=True) and sum(s.numel() for s in mine) == g.grad.numel()
    assert len(buckets.spans) > 3 and sum(buckets.sizes) == sum(len(g.params) for g in groups)
    launches, waits = [], []

    class Handle:
        def wait(self):
            waits.append(1)

    def record(world, span, op, then=None):
        launches.append((span.data_ptr(), embed.grad.abs().sum().item()))
        return Handle()

    monkeypatch.setattr(comm, "all_reduce", record)
    readiness = GradReadiness([p for g in groups for p in g.params], buckets.param_ready)
    for report in (True, True):
        for g in groups:
            g.grad.zero_()
        launches.clear()
        buckets.start()
        with readiness.micro_step(report):
            _backward(model, _batch(generator))
        buckets.finish()
        assert sorted(ptr for ptr, _ in launches) == sorted(s.data_ptr() for s in buckets.spans)
    assert launches[0][1] == 0.0  # the first reduction started before the embedding had any gradient
    assert len(waits) == 2 * len(buckets.spans)
