"""Write a Hugging Face model folder with random weights for a benchmark shape (no download needed), with the
quickstart's tokenizer files, so that `surogate sft` can run at real model sizes anywhere.

Usage: python tools/make_random_model.py qwen3-0.6b /tmp/qwen3-0.6b [--device cuda]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "bench"))
from bench_sft import SHAPES  # noqa: E402

from surogate.models import init_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("output")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config = dict(SHAPES[args.shape], rms_norm_eps=1e-6, max_position_embeddings=40960, torch_dtype="bfloat16",
                  model_type=SHAPES[args.shape]["architectures"][0].removesuffix("ForCausalLM").lower())
    config.setdefault("rope_theta", 1000000.0)
    model = init_model(config, dtype=torch.bfloat16, device=args.device)
    out = Path(args.output)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "examples/quickstart/model" / name, out / name)
    print(f"wrote {args.shape} with random weights to {out}")


if __name__ == "__main__":
    main()
