"""`cortex model`: make test checkpoints, write tensor manifests and describe checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Kept here, not imported from cortex.runtime.testmodels, so `cortex --help` stays free of torch.
TEST_ARCHITECTURES = (
    "deepseek_v3",
    "deepseek_v2",
    "deepseek_v2_lite",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "llama",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "model",
        help="make tiny test checkpoints, write tensor manifests and describe checkpoints",
        description=(
            "Make tiny seeded test checkpoints, write or check a checkpoint's tensor manifest, print its model id, "
            "or describe its fragments."
        ),
    )
    commands = parser.add_subparsers(dest="model_command", metavar="COMMAND")

    make = commands.add_parser(
        "make-test",
        help="write a tiny seeded checkpoint of one architecture",
        description=(
            "Write a tiny checkpoint (hidden size 64, 2-3 layers) built with transformers' own model class, "
            "saved in small shards so that one expert's tensors span files, with a BPE tokenizer trained "
            "offline. Weights are scaled (std 0.1, routers 0.5, random DeepSeek-V3 correction bias) so that "
            "routing bugs change the output."
        ),
    )
    make.add_argument("--arch", required=True, choices=TEST_ARCHITECTURES, help="architecture of the checkpoint")
    make.add_argument("--out", required=True, type=Path, help="folder to write (created if missing)")
    make.add_argument("--seed", type=int, default=0, help="seed of the weights (default: 0)")
    make.add_argument(
        "--fused",
        action="store_true",
        help="write experts fused per layer (experts.gate_up_proj, experts.down_proj) instead of one tensor each",
    )
    make.set_defaults(func=_run_make_test)

    manifest = commands.add_parser(
        "manifest",
        help="write or check the tensor manifest that makes the model id cover the weights",
        description=(
            "Read every tensor of the checkpoint once and write DIR/cortex-manifest.json with each tensor's name, "
            "dtype, shape and SHA-256 of its stored bytes (and of each row block for tensors of rank 3 or more). "
            "With a manifest, the model id covers the weights and every load is verified against it. Run it once "
            "when publishing a model and ship the file with the weights."
        ),
    )
    manifest.add_argument("checkpoint", type=Path, metavar="DIR", help="checkpoint folder")
    manifest.add_argument(
        "--check",
        action="store_true",
        help="verify the existing manifest against the shards and list every tensor that differs (exit status 1)",
    )
    manifest.set_defaults(func=_run_manifest)

    ident = commands.add_parser(
        "id",
        help="print a checkpoint's model id",
        description=(
            "Print the digest of config.json and the tensor index: names, dtypes and shapes, plus the SHA-256 of "
            "every tensor when the folder has a cortex-manifest.json."
        ),
    )
    ident.add_argument("checkpoint", type=Path, help="checkpoint folder")
    ident.set_defaults(func=_run_id)

    info = commands.add_parser(
        "info",
        help="describe a checkpoint's architecture and fragments",
        description="Print the architecture, layers, MoE layers, experts and model id of a checkpoint.",
    )
    info.add_argument("checkpoint", type=Path, help="checkpoint folder")
    info.set_defaults(func=_run_info)

    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _run_make_test(args: argparse.Namespace) -> int:
    from cortex.runtime.testmodels import make_test_checkpoint

    out = make_test_checkpoint(args.arch, args.out, seed=args.seed, fused=args.fused)
    print(out)
    return 0


def _run_manifest(args: argparse.Namespace) -> int:
    from cortex.runtime.checkpoint import Checkpoint
    from cortex.runtime.errors import ModelRuntimeError
    from cortex.runtime.manifest import (
        MANIFEST_FILE,
        compare_manifests,
        compute_manifest,
        read_manifest,
        write_manifest,
    )
    from cortex.runtime.model_id import model_id

    try:
        checkpoint = Checkpoint(args.checkpoint)
        if not args.check:
            written = write_manifest(checkpoint)
            print(f"wrote {checkpoint.path / MANIFEST_FILE} ({len(written.tensors)} tensors)")
            print(f"model id: {model_id(checkpoint)}")
            return 0
        listed = read_manifest(checkpoint.path)
        if listed is None:
            print(
                f"error: {checkpoint.path / MANIFEST_FILE} not found; run `cortex model manifest {checkpoint.path}` "
                "to write one",
                file=sys.stderr,
            )
            return 1
        problems = compare_manifests(listed, compute_manifest(checkpoint))
    except ModelRuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if problems:
        print(f"{checkpoint.path / MANIFEST_FILE} differs from the shards in {len(problems)} tensors:")
        for line in problems:
            print(f"  {line}")
        print("re-download the checkpoint, or regenerate the manifest if the weights changed on purpose")
        return 1
    print(f"{checkpoint.path / MANIFEST_FILE}: all {len(listed.tensors)} tensors match")
    return 0


def _run_id(args: argparse.Namespace) -> int:
    from cortex.runtime.errors import ModelRuntimeError
    from cortex.runtime.model_id import model_id

    try:
        print(model_id(args.checkpoint))
    except ModelRuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from cortex.runtime.errors import ModelRuntimeError
    from cortex.runtime.loader import Loader
    from cortex.runtime.manifest import MANIFEST_FILE
    from cortex.runtime.model_id import model_id

    try:
        loader = Loader(args.checkpoint, device="cpu")
        identity = model_id(loader.checkpoint)
        manifest = loader.checkpoint.manifest
    except ModelRuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    moe = loader.moe_layers
    print(f"model id:       {identity}")
    if manifest is not None:
        print(f"weights:        covered by the id ({MANIFEST_FILE}, {len(manifest.tensors)} tensors)")
    else:
        print(f"weights:        not covered by the id (no {MANIFEST_FILE}; run `cortex model manifest`)")
    print(f"architecture:   {loader.arch.model_type}")
    print(f"layers:         {loader.num_layers} (fragments block[a:b] with 0 <= a < b <= {loader.num_layers})")
    print(f"hidden size:    {loader.hidden_size}")
    print(f"MoE layers:     {moe if moe else 'none (dense model)'}")
    if moe:
        print(f"experts/layer:  {loader.num_experts} (fragments expert[l][e] with l in MoE layers, e < {loader.num_experts})")
    quantized = "fp8 block " + "x".join(map(str, loader.checkpoint.fp8_block)) if loader.checkpoint.fp8_block else "none"
    print(f"quantization:   {quantized}")
    return 0
