"""End-to-end training throughput: our trainer and the peers on the same shapes and tokens, in one process on one GPU.

For each (model shape, mode, recipe) it runs
  - surogate: the trainer's step (CUDA graphs on by default),
  - transformers + peft (bf16 weights, SDPA attention, torch AdamW),
  - transformers + peft + Liger-Kernel (when its wheel is importable), optionally with gradient checkpointing,
with random weights (no downloads) and random tokens, and prints tokens/s, step time, peak memory and MFU per row.
Rows are appended to benchmarks/sft.csv (date, gpu, framework, model, mode, recipe, seq_len, micro_batch,
tokens_per_s, step_ms, peak_gib, mfu, command).

Usage: python tools/bench/bench_sft.py --models qwen3-0.6b --modes lora,full --frameworks surogate,hf,hf-liger
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import append_rows  # noqa: E402

# Hugging Face config.json contents of the benchmark shapes (random weights are generated from these).
SHAPES = {
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False),
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.2-3b": dict(architectures=["LlamaForCausalLM"], hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16 datasheet peak, for MFU


def hf_config(name: str):
    import transformers

    shape = dict(SHAPES[name])
    arch = shape.pop("architectures")[0]
    config_cls = {"Qwen3ForCausalLM": transformers.Qwen3Config, "LlamaForCausalLM": transformers.LlamaConfig}[arch]
    shape.setdefault("rope_theta", 1000000.0)
    shape.update(rms_norm_eps=1e-6, max_position_embeddings=40960, torch_dtype="bfloat16")
    return arch, config_cls(**shape)


def count_params(name: str) -> tuple[int, int]:
    """(total params, params in the matmuls of one token's forward, for MFU: 6 * N * tokens + attention)."""
    s = SHAPES[name]
    C, I, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    per_layer = C * (q + 2 * kv) + q * C + 3 * C * I
    return L * per_layer + V * C * (1 if s["tie_word_embeddings"] else 2), L * per_layer + V * C


def model_flops_per_token(name: str, seq_len: int, mode: str) -> float:
    """Training FLOPs per token: 6N for full fine-tune (fwd + dgrad + wgrad), 4N for LoRA (frozen weights get no wgrad),
    plus causal attention (fwd 2*2*T*d/2 per layer, bwd 2x that)."""
    s = SHAPES[name]
    _, n_matmul = count_params(name)
    attn = 3 * 2 * 2 * s["num_hidden_layers"] * s["num_attention_heads"] * s["head_dim"] * seq_len / 2
    return (6 if mode == "full" else 4) * n_matmul + attn


def make_batches(vocab: int, micro_batch: int, seq_len: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g) for _ in range(n)]


def run_hf(name, mode, seq_len, micro_batch, steps, warmup, liger=False, checkpointing=False):
    """transformers (+ peft) (+ Liger) on the same shapes: bf16 weights, SDPA, torch AdamW (fused)."""
    import transformers

    arch, config = hf_config(name)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    if liger:
        import liger_kernel.transformers as lk

        apply = {"Qwen3ForCausalLM": lk.apply_liger_kernel_to_qwen3,
            "LlamaForCausalLM": lk.apply_liger_kernel_to_llama}[arch]
        apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    model_cls = getattr(transformers, arch)
    with torch.device("cuda"):
        model = model_cls(config).to(torch.bfloat16)
    if mode == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    batches = [b.cuda() for b in make_batches(config.vocab_size, micro_batch, seq_len, 4)]

    def step(i):
        b = batches[i % len(batches)]
        out = model(input_ids=b[:, :-1], labels=b[:, :-1])  # transformers shifts the labels itself
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    return time_steps(step, steps, warmup)


MEMORY: dict[str, float] = {}  # the last surogate run's memory breakdown (GiB), printed with --memory-breakdown


def run_surogate(name, mode, seq_len, micro_batch, steps, warmup, recipe="bf16", cuda_graphs=True, recompute=None,
                 docs_per_row=1, offload_residual=False, offload_weights=False):
    """Our training step (surogate.cli.step.TrainStep: flat buffers, fused AdamW, CUDA graphs) on the same shapes.
    By default each row is one causal sequence, exactly the attention work the peers do; docs_per_row > 1 packs
    documents (FlashAttention varlen with document masking: less attention work). offload_residual (with
    recompute="block"): each layer's residual in pinned host memory between forward and backward. offload_weights
    (LoRA): the frozen base weights in pinned host memory, streamed a layer ahead of use; they are drawn on the GPU
    here (a loaded model is read into host memory instead), so the returned peak is the training peak alone.
    Fills MEMORY: the peak while the random weights were drawn (init only: loading a checkpoint has no fp32 draw),
    weights (after init), + optimizer (after TrainStep: trainable weights' grads, fp32 master, AdamW states), the
    training peak (warm-up, capture, steps) and the offload host buffers; the returned peak is the whole run's."""
    from surogate.cli.param_group import param_groups
    from surogate.cli.step import TrainStep
    from surogate.models import LoraConfig, init_model

    arch, config = hf_config(name)
    lora = LoraConfig(rank=16, alpha=32, target_modules=tuple(LORA_TARGETS)) if mode == "lora" else None
    qlora = recipe.removeprefix("qlora-") if recipe.startswith("qlora-") else None  # e.g. "qlora-nf4"
    model = init_model(config.to_dict() | {"architectures": [arch]}, dtype=torch.bfloat16, device="cuda", lora=lora,
                       recompute=recompute, recipe="bf16" if qlora else recipe, qlora=qlora,
                       offload_residual=offload_residual, offload_weights=offload_weights)
    MEMORY.clear()
    MEMORY["init peak"] = torch.cuda.max_memory_allocated() / 2**30
    MEMORY["weights"] = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    groups = param_groups(model.trainable_parameters(), weight_decay=0.0 if mode == "lora" else 0.1)
    train_step = TrainStep(model, groups, micro_batch=micro_batch, seq_len=seq_len, cuda_graphs=cuda_graphs)
    MEMORY["weights+optimizer"] = torch.cuda.memory_allocated() / 2**30
    doc = seq_len // docs_per_row
    position_ids = torch.arange(seq_len).remainder(doc).expand(micro_batch, seq_len).contiguous()
    batches = [dict(input_ids=b[:, :-1].contiguous(), labels=b[:, 1:].contiguous(), position_ids=position_ids)
               for b in make_batches(config.vocab_size, micro_batch, seq_len, 4)]

    def step(i):
        loss_sum, valid, _ = train_step([batches[i % len(batches)]], lr=1e-5, step=i + 1)
        model.after_optimizer_step()  # fp8 delayed scaling: amax history -> next scales (no-op for bf16)
        return loss_sum / valid

    step_s, peak, loss = time_steps(step, steps, warmup)
    MEMORY["training peak"] = peak
    if offload_residual:
        MEMORY["offload host"] = model._offload.nbytes()[0] / 2**30
    if offload_weights:
        MEMORY["offload host"] = MEMORY.get("offload host", 0.0) + model.host_weights.nbytes()[0] / 2**30
        return step_s, peak, loss
    return step_s, max(peak, MEMORY["init peak"]), loss


def time_steps(step, steps, warmup):
    for i in range(warmup):
        loss = step(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed / steps, torch.cuda.max_memory_allocated() / 2**30, float(loss.detach())


FRAMEWORKS = {
    "surogate": lambda n, m, s, b, st, w, r: run_surogate(n, m, s, b, st, w, recipe=r),
    "surogate-eager": lambda n, m, s, b, st, w, r: run_surogate(n, m, s, b, st, w, recipe=r, cuda_graphs=False),
    "surogate-ckpt": lambda n, m, s, b, st, w, r: run_surogate(n, m, s, b, st, w, recipe=r, recompute="block"),
    "surogate-ckpt-offload": lambda n, m, s, b, st, w, r: run_surogate(n, m, s, b, st, w, recipe=r, recompute="block",
                                                                       offload_residual=True),
    "surogate-ckpt-offload-weights": lambda n, m, s, b, st, w, r: run_surogate(
        n, m, s, b, st, w, recipe=r, recompute="block", offload_residual=True, offload_weights=True),
    "surogate-packed": lambda n, m, s, b, st, w, r: run_surogate(n, m, s, b, st, w, recipe=r, docs_per_row=4),
    "hf": lambda n, m, s, b, st, w, r: run_hf(n, m, s, b, st, w),
    "hf-liger": lambda n, m, s, b, st, w, r: run_hf(n, m, s, b, st, w, liger=True),
    "hf-liger-ckpt": lambda n, m, s, b, st, w, r: run_hf(n, m, s, b, st, w, liger=True, checkpointing=True),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="qwen3-0.6b")
    parser.add_argument("--modes", default="lora")
    parser.add_argument("--recipes", default="bf16")
    parser.add_argument("--frameworks", default="surogate,hf,hf-liger")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/sft.csv")
    parser.add_argument("--memory-breakdown", action="store_true",
                        help="after each surogate row: weights, + optimizer, offload host buffers, peak (GiB)")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    rows = []
    print(f"# {gpu}; seq_len {args.seq_len}, micro-batch {args.micro_batch}; "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"{'framework':21} {'model':13} {'mode':5} {'recipe':11} {'tok/s':>9} {'step ms':>8} {'peak GiB':>8} "
          f"{'MFU':>6}  loss")
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            for recipe in args.recipes.split(","):
                for fw in args.frameworks.split(","):
                    if fw.startswith("hf") and recipe != "bf16":
                        continue
                    torch.cuda.reset_peak_memory_stats()  # peak over the whole run: model, warm-up, capture, steps
                    try:
                        step_s, peak, loss = FRAMEWORKS[fw](name, mode, args.seq_len, args.micro_batch, args.steps,
                                                            args.warmup, recipe)
                    except Exception as e:  # a peer that is not installed or runs out of memory: say so, go on
                        print(f"{fw:21} {name:13} {mode:5} {recipe:11} failed: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    finally:
                        gc.collect()
                        torch.cuda.empty_cache()
                    tokens = args.seq_len * args.micro_batch
                    tps = tokens / step_s
                    mfu = tps * model_flops_per_token(name, args.seq_len, mode) / (H100_BF16_PEAK_TFLOPS * 1e12)
                    row = dict(date=datetime.date.today().isoformat(), gpu=gpu, framework=fw, model=name, mode=mode,
                               recipe=recipe, seq_len=args.seq_len, micro_batch=args.micro_batch,
                               tokens_per_s=round(tps), step_ms=round(step_s * 1e3, 2), peak_gib=round(peak, 2),
                               mfu=round(mfu, 4), command=command)
                    rows.append(row)
                    print(f"{fw:21} {name:13} {mode:5} {recipe:11} {tps:9.0f} {step_s * 1e3:8.1f} {peak:8.2f} "
                          f"{100 * mfu:5.1f}%  {loss:.3f}")
                    if args.memory_breakdown and fw.startswith("surogate"):
                        parts = ", ".join(f"{k} {v:.2f}" for k, v in MEMORY.items())
                        rest = MEMORY["training peak"] - MEMORY["weights+optimizer"]
                        print(f"{'':21} memory GiB: {parts}; activations + transients at the training peak {rest:.2f}")
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()
