"""The `surogate` (and `surogate-cli`) command. Subcommands import their modules lazily: `--help` stays instant.

Exit codes: 0 done; 2 bad input (a UserError from surogate.cli or a ModelError from surogate.models: a one-paragraph
message on stderr naming the file/key/row and the fix, no traceback); 130 interrupted (Ctrl-C)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .__about__ import __version__

# name -> (module under surogate.cli, one-line help)
COMMANDS = {
    "sft": ("sft", "supervised fine-tuning (full, LoRA, QLoRA) from a YAML config"),
    "pt": ("pt", "pre-training / continued pre-training on raw text from a YAML config"),
    "tokenize": ("tokenize", "tokenize and pack the config's datasets only (--debug shows trained/masked tokens)"),
    "merge": ("merge", "merge a LoRA adapter into its base model and write a Hugging Face folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surogate", description="Surogate: fast LLM pre-training and fine-tuning.")
    parser.add_argument("--version", action="version", version=f"surogate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == "merge":
            p.add_argument("adapter", help="folder with adapter_config.json and adapter_model.safetensors")
            p.add_argument("output", help="folder to write the merged model to")
            p.add_argument("--base", help="base model folder (default: base_model_name_or_path of the adapter)")
        else:
            p.add_argument("config", help="YAML config file")
            p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4 lora_rank=8")
        if name == "tokenize":
            p.add_argument("--debug", action="store_true", help="show which tokens are trained, masked or padding")
            p.add_argument("--rows", type=int, default=3, help="rows to show with --debug")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        module = importlib.import_module(f"surogate.cli.{args._module}")
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("surogate: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"surogate {args.command}: error: {e}", file=sys.stderr)
        return 2


def _is_user_error(e: BaseException) -> bool:
    """UserError (ours) or surogate.models.ModelError, without importing surogate.models (torch) to find out."""
    from .errors import UserError

    if isinstance(e, UserError):
        return True
    models = sys.modules.get("surogate.models")
    model_error = getattr(models, "ModelError", None)
    return model_error is not None and isinstance(e, model_error)


if __name__ == "__main__":
    sys.exit(main())
