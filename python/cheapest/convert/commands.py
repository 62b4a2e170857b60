"""`cheapest model pull` and `cheapest model convert GGUF DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cheapest.config import Settings


def _pull(args: argparse.Namespace, settings: Settings) -> int:
    from .catalog import UnknownModelError, catalog_entry
    from .pull import ensure_default_model, ensure_model

    models, cache = settings.models_path, settings.cache_path
    try:
        for name in args.model:
            catalog_entry(name)  # every name is known before anything is downloaded
    except UnknownModelError as exc:
        print(f"cheapest model pull: {exc}", file=sys.stderr)
        return 2
    outs = [ensure_model(name, models, cache, progress=not args.quiet) for name in args.model] if args.model \
        else [ensure_default_model(models, cache, progress=not args.quiet)]
    for out in outs:
        print(out)
    return 0


def _convert(args: argparse.Namespace, settings: Settings) -> int:
    from .converter import convert
    from .gguf_reader import UnsupportedModelError

    progress = None
    if not args.quiet:
        from tqdm import tqdm
        progress = tqdm
    try:
        out = convert(args.gguf, args.dir, progress=progress, accuracy_level=args.accuracy_level)
    except UnsupportedModelError as exc:
        print(f"cheapest model convert: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="fetch and convert models")
    sub = model.add_subparsers(dest="model_command", required=True)
    pull = sub.add_parser("pull", help="download and convert models if missing (default: SmolLM2-135M-Instruct)")
    pull.add_argument("model", nargs="*", help="catalogued models, e.g. gemma-3-270m")
    pull.add_argument("--quiet", action="store_true", help="no progress bars")
    pull.set_defaults(func=_pull)
    conv = sub.add_parser("convert", help="convert a GGUF (llama, qwen2, qwen3, phi3, gemma3) into an ONNX model directory")
    conv.add_argument("gguf", type=Path)
    conv.add_argument("dir", type=Path)
    conv.add_argument("--accuracy-level", type=int, default=0, choices=(0, 4),
                      help="MatMulNBits accuracy_level of the fused graph: 0 = fp32 activations (default, "
                           "matches the fp32 graph), 4 = int8 activations (faster, llama.cpp-like precision)")
    conv.add_argument("--quiet", action="store_true", help="no progress bars")
    conv.set_defaults(func=_convert)
