"""ZeRO-3 weights provider (surogate.dist.GatheredParameters) on a real CausalLM, in one process (world size 1: the
gathers are copies, so everything else — placeholders, saved-tensor tokens, gathering again for backward, gradient
scratch and grad_ready per part — runs as under mpirun; tests/cli/test_cli_mpirun.py runs it on 2 ranks).

Truth: the same model without a provider (autograd into the parameters). The gradients are the same numbers summed
in another order only where a weight is used twice (tied embeddings): fp32 tolerance.
"""

import pytest
import surogate.dist as sd
import torch
from surogate.kernels.testing import assert_close
from surogate.models import LoraConfig, init_model

CONFIG = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 97,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128}


@pytest.fixture
def world():
    w = sd.init("cpu")
    yield w
    sd.shutdown()


def _model(tied: bool, lora: bool, recompute):
    config = dict(CONFIG, tie_word_embeddings=tied)
    adapters = LoraConfig(rank=4, alpha=8) if lora else None
    torch.manual_seed(5)  # the LoRA A init draws from the global generator
    return init_model(config, dtype=torch.float32, lora=adapters, recompute=recompute, seed=3, std=0.1)


def _batch():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=g)
    labels = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=g)
    labels[:, :3] = -100
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)  # two packed documents per row
    return ids, labels, position_ids


def _parts(model):
    n = model.config.num_layers
    part = {}
    for name, p in model.trainable_parameters():
        if name.startswith("model.embed_tokens."):
            part[id(p)] = 0
        elif name.startswith("model.layers."):
            part[id(p)] = 1 + int(name.split(".")[2])
        else:
            part[id(p)] = n + 1
    return part


def _shard(world, model, tied, sparse_lookup=False):
    """One engine per weight-decay group (matrices / vectors), one layout group per part, as the trainer does (the
    trainer's order starts at part 1 with sparse_lookup: the input lookup gathers nothing)."""
    part = _parts(model)
    n_parts = model.config.num_layers + 2
    named = model.trainable_parameters()
    engines = []
    for params in ([p for _, p in named if p.dim() >= 2], [p for _, p in named if p.dim() < 2]):
        if not params:
            continue
        groups = [[p for p in params if part[id(p)] == g] for g in range(n_parts)]
        layout = sd.FlatLayout([sum(p.numel() for p in grp) for grp in groups], world.world_size, bucket_numel=0)
        flat = torch.zeros(layout.numel)
        sd.bind_parameters(layout, groups, flat)
        dp = sd.DataParallel(world, layout, flat, None, zero=3, average=False,
                             make_state=lambda m: {"exp_avg": torch.zeros_like(m)})
        engines.append((dp, groups))
    order = list(range(1 if sparse_lookup else 0, n_parts)) + ([0] if tied else [])
    return sd.GatheredParameters(engines, order, sparse_lookup=sparse_lookup), engines


def _count_gathers(monkeypatch) -> list[int]:
    """The groups whose all-gather is launched (not already gathered or in flight), in order, from now on."""
    launched = []
    prefetch = sd.ShardedParameters.prefetch

    def counting(self, group):
        b = self.layout.group_bucket[group] if 0 <= group < len(self.layout.group_sizes) else None
        if b is not None and b not in self._full and b not in self._inflight and self.layout.group_sizes[group]:
            launched.append(group)
        prefetch(self, group)

    monkeypatch.setattr(sd.ShardedParameters, "prefetch", counting)
    return launched


def _assert_grad_shards(engines, names, want):
    """The reduced gradient shard (world size 1: all of it) of every parameter against autograd's `want[name]`."""
    for dp, groups in engines:
        for g, plist in enumerate(groups):
            flat = dp.grad_shard[dp.layout.buckets[dp.layout.group_bucket[g]].shard_span]
            offset = 0
            for p in plist:
                got = flat[offset : offset + p.numel()].view(p.shape)
                assert_close(got, want[names[id(p)]], torch.float32, names[id(p)])
                offset += p.numel()


@pytest.mark.parametrize(("tied", "lora", "recompute"), [(True, False, None), (False, True, "block"),
                                                           (False, False, "block")])
def test_gathered_weights_give_the_gradients_of_the_plain_model(world, tied, lora, recompute):
    ids, labels, pos = _batch()
    plain = _model(tied, lora, recompute)
    loss, n = plain.loss_sum(ids, labels, pos)
    (loss / n).backward()
    want = {name: p.grad.clone() for name, p in plain.trainable_parameters()}
    weights = {name: p.detach().clone() for name, p in plain.trainable_parameters()}

    model = _model(tied, lora, recompute)
    names = {id(p): name for name, p in model.trainable_parameters()}
    gathered, engines = _shard(world, model, tied)
    model.weights_provider = gathered
    assert all(torch.isnan(p).all() and p.untyped_storage().nbytes() <= 4 for _, p in model.trainable_parameters())
    with engines[0][0].micro_step(), engines[-1][0].micro_step() if len(engines) > 1 else _nothing(), \
            gathered.scope():
        got_loss, got_n = model.loss_sum(ids, labels, pos)
        # after forward: the weights saved for backward are tokens, at most the last part stays gathered
        assert sum(gathered._packed.values()) >= 4 * model.config.num_layers
        assert len({g for _, g in gathered._live}) <= 1
        (got_loss / got_n).backward()
    assert torch.equal(got_loss, loss) and int(got_n) == int(n)
    _assert_grad_shards(engines, names, want)
    gathered.unshard()
    for name, p in model.trainable_parameters():
        assert torch.equal(p, weights[name]), name


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def test_a_tied_embedding_is_gathered_once_per_forward(world, monkeypatch):
    """order [0, 1, ..., L+1, 0]: the embedding part stays gathered for the head instead of being gathered again;
    every layer part is gathered once."""
    launched = _count_gathers(monkeypatch)
    model = _model(True, False, None)
    gathered, engines = _shard(world, model, True)
    model.weights_provider = gathered
    ids, labels, pos = _batch()
    with torch.no_grad():
        model.loss_sum(ids, labels, pos)
    matrices = engines[0][0]  # the embedding is a matrix: part 0 of the first engine
    assert launched.count(0) == 1, launched
    assert all(launched.count(g) <= len(engines) for g in range(1, model.config.num_layers + 2)), launched
    assert matrices.layout.group_sizes[0] > 0


def test_eval_without_grad_gathers_and_counts_no_uses(world):
    model = _model(True, False, None)
    ids, labels, pos = _batch()
    want = model.loss_sum(ids, labels, pos)[0].detach()
    gathered, _ = _shard(world, model, True)
    model.weights_provider = gathered
    with torch.no_grad():
        got = model.loss_sum(ids, labels, pos)[0]
    assert torch.equal(got, want)
    assert not gathered._uses


def test_engines_must_be_zero_3_with_one_bucket_per_part(world):
    layout = sd.FlatLayout([4, 4], 1, bucket_numel=0)
    p = torch.nn.Parameter(torch.randn(8))
    dp = sd.DataParallel(world, layout, torch.zeros(layout.numel), torch.zeros(layout.numel), zero=1,
                         make_state=lambda m: {})
    with pytest.raises(ValueError, match="needs zero=3"):
        sd.GatheredParameters([(dp, [[p], []])])


def test_saved_outputs_inside_the_scope_are_freed_with_their_graph(world):
    """A node that saves its own output (exp here; cuDNN attention's inner graph in recompute's forward on the GPU)
    must not be held by the saved-tensor hooks: returning the tensor itself from pack makes a cycle that not even
    gc collects, one leaked activation per layer and step."""
    import weakref

    model = _model(False, False, None)
    gathered, engines = _shard(world, model, False)
    x = torch.randn(16, requires_grad=True)
    with engines[0][0].micro_step(), engines[-1][0].micro_step(), gathered.scope():
        y = x.exp()
        ref = weakref.ref(y)
        del y
        assert ref() is None
        z = x.exp()
        z.sum().backward()  # and a saved output still comes back for backward
    assert torch.equal(x.grad, x.detach().exp())


@pytest.mark.parametrize("tied", [True, False])
def test_sparse_lookup_gives_the_gradients_of_the_plain_model(world, tied, monkeypatch):
    """sparse_lookup: the input embeddings come from the shards and their gradient goes straight into the gradient
    shard. Same loss and gradients as the plain model; the embedding part is gathered only for a tied head, and an
    untied embedding's bucket is never reduced (tests/dist/workers/sharded_table.py checks the 2-rank geometry)."""
    launched = _count_gathers(monkeypatch)
    ids, labels, pos = _batch()
    plain = _model(tied, False, None)
    loss, n = plain.loss_sum(ids, labels, pos)
    (loss / n).backward()
    want = {name: p.grad.clone() for name, p in plain.trainable_parameters()}

    model = _model(tied, False, None)
    names = {id(p): name for name, p in model.trainable_parameters()}
    gathered, engines = _shard(world, model, tied, sparse_lookup=True)
    model.weights_provider = gathered
    matrices = engines[0][0]
    reduced = []
    launch = matrices._launch
    monkeypatch.setattr(matrices, "_launch", lambda b: (reduced.append(b), launch(b)))
    with matrices.micro_step(), engines[1][0].micro_step(), gathered.scope():
        got_loss, got_n = model.loss_sum(ids, labels, pos)
        (got_loss / got_n).backward()
    assert torch.equal(got_loss, loss) and int(got_n) == int(n)
    assert launched.count(0) == (1 if tied else 0), launched
    assert (matrices.layout.group_bucket[0] in reduced) == tied, reduced
    _assert_grad_shards(engines, names, want)
    with torch.no_grad():  # evaluation looks the gathered table up: no collective shapes to agree on
        assert torch.equal(model.loss_sum(ids, labels, pos)[0], loss.detach())
