"""`robustbench-ft import-checkpoint | zoo`: checkpoints of other codebases as classifiers; the demo model and zoo."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robustbench_ft.config import RunConfig


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.zoo_command == "pretrain-demo":
        from robustbench_ft.zoo.pretrain_demo import PretrainDemoConfig, pretrain_demo

        summary = pretrain_demo(PretrainDemoConfig(), Path(args.out))
        print(json.dumps(summary, indent=2, default=str))
    else:
        from robustbench_ft.zoo.baselines import build_demo_zoo

        paths = build_demo_zoo(out_dir=Path(args.out), data_root=Path(args.data_root), only=args.only or None)
        print(f"{len(paths)} baseline record(s) in {args.out}")
    return 0


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from robustbench_ft.datasets.registry import get_dataset, get_suite
    from robustbench_ft.models.checkpoints import import_checkpoint

    reference = get_dataset(get_suite(args.suite).reference)
    classifier = import_checkpoint(args.checkpoint, args.model, reference.classnames, reference.templates,
                                   trust_pickle=args.trust_pickle)
    weights = classifier.save(args.out)
    layout = classifier.info.provenance["layout"]
    print(f"imported {args.checkpoint} (image encoder under {layout['encoder']!r}, head: {layout['head']}) as a "
          f"{args.model} classifier of {classifier.num_classes} {reference.name} classes: {weights} (+ .json); "
          f"use it with `robustbench-ft run --method wise-ft --model {args.model} --suite {args.suite} "
          f"--finetuned {weights}`")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    zp = sub.add_parser("zoo", help="rebuild the embedded demo model or the demo baseline zoo")
    zsub = zp.add_subparsers(dest="zoo_command", required=True)
    zpre = zsub.add_parser("pretrain-demo", help="pretrain the demo CLIP from its recipe (CPU, tens of minutes)")
    zpre.add_argument("--out", default="rbft-demo-vit", help="output path stem (.safetensors and .json are written)")
    zbase = zsub.add_parser("baselines", help="train and evaluate the demo suite's baseline zoo (reference data only)")
    zbase.add_argument("--out", default="demo-zoo", help="directory for the baseline records")
    zbase.add_argument("--data-root", default=RunConfig.data_root)
    zbase.add_argument("--only", nargs="*", help="rebuild only these zoo models")
    zpre.set_defaults(handler=cmd_zoo)
    zbase.set_defaults(handler=cmd_zoo)
    ip = sub.add_parser("import-checkpoint", help="convert a fine-tuned CLIP checkpoint from another codebase",
                        description="Read an open_clip state dict, a model-soups or WiSE-FT checkpoint (or a full "
                                    "CLIP state dict, whose own text tower then gives the zero-shot head) and save "
                                    "it as a classifier (.safetensors + .json) for `run --finetuned`. Pickles that "
                                    "are not plain tensors are refused unless --trust-pickle.")
    ip.add_argument("checkpoint", help="checkpoint file (.safetensors, .pt, .pth, .bin, .ckpt) or an "
                                       "hf-hub:ORG/REPO[@REVISION][/FILE] reference")
    ip.add_argument("out", type=Path, help="output path stem: OUT.safetensors and OUT.json are written")
    ip.add_argument("--model", required=True, help="open_clip architecture of the checkpoint (e.g. ViT-B-32)")
    ip.add_argument("--suite", default=RunConfig.suite, help="suite whose reference classes the head predicts")
    ip.add_argument("--trust-pickle", action="store_true",
                    help="allow a full unpickle (can run code: only for files from authors you trust)")
    ip.set_defaults(handler=cmd_import_checkpoint)
