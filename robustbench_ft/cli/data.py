"""`robustbench-ft list | shard | verify`: what is registered, and shard sets made and checked."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from robustbench_ft.cli.run import flag
from robustbench_ft.config import RunConfig


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from robustbench_ft.methods.registry import list_methods

        for m in list_methods():
            print(f"{m.name:12s} {m.summary}")
            if m.paper:
                print(f"{'':12s} paper: {m.paper}")
            if m.defaults:
                print(f"{'':12s} defaults: {m.defaults}")
            for f in dataclasses.fields(m.options):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                print(f"{'':12s}   {flag(f.name)} (default: {default})")
    elif args.what == "datasets":
        from robustbench_ft.datasets.registry import list_datasets

        for d in list_datasets():
            built = [s for s in d.splits if (d.path(Path(args.data_root), s) / "manifest.json").is_file()]
            print(f"{d.name:16s} {len(d.classnames):5d} classes  metric={d.metric:6s} splits={','.join(d.splits)}"
                  f"  built={','.join(built) or 'no'}  {d.description}")
    elif args.what == "suites":
        from robustbench_ft.datasets.build import suite_data_status
        from robustbench_ft.datasets.registry import list_suites
        from robustbench_ft.datasets.robust_transfer import COLLECTIONS

        for name, members in COLLECTIONS.items():
            print(f"{name} (collection: run --suite {name} runs each): {', '.join(members)}")
        for s in list_suites():
            print(f"{s.name}: reference {s.reference}; shifts {', '.join(s.shifts) or 'none'}; "
                  f"train {'/'.join(s.train) if s.train else 'none'}; baseline {s.baseline or 'none'}")
            if s.description:
                print(f"    {s.description}")
            status = suite_data_status(s, Path(args.data_root))
            print(f"    data under {args.data_root}: " + "; ".join(f"{state}: {', '.join(splits)}"
                                                                   for state, splits in status.items()))
            for m, d in s.method_defaults.items():
                print(f"    defaults for {m}: {d}")
            if s.defaults_source:
                print(f"    defaults from: {s.defaults_source}")
    else:
        from robustbench_ft.models.clip import list_models, pretrained_tags

        for name in list_models():
            tags = pretrained_tags(name)
            print(f"{name:40s} {', '.join(tags) if tags else '(no pretrained tags: random or a local file)'}")
    return 0


_IMPORT_ONLY = ("region_names", "fmow_metadata", "keep_source")  # --dataset: also imagefolder


def cmd_shard(args: argparse.Namespace) -> int:
    src, out = args.src or args.src_path, args.out or args.out_path
    if args.format == "import-wds":
        return cmd_import_wds(args, src, out)
    if args.format == "imagefolder":
        wrong = {"--border-crop": args.border_crop, "--allow-count-mismatch": args.allow_count_mismatch or None,
                 "--split": None if args.split == "test" else args.split}
        where = "dataset conversions (`shard DATASET --src RAW`)"
    else:
        wrong = {"--name": args.name, "--shuffle-seed": args.shuffle_seed, "--dataset": args.dataset}
        where = "`shard imagefolder` (dataset converters shuffle their training splits themselves)"
    for flags, place in (([f for f, v in wrong.items() if v is not None], where),
                         ([flag(n) for n in _IMPORT_ONLY if getattr(args, n) not in (None, False)],
                          "`shard import-wds SRC --dataset NAME`")):
        if flags:
            raise ValueError(f"{', '.join(flags)}: only for {place}")
    src = None if src is None else Path(src)
    out = None if out is None else Path(out)
    if args.format == "imagefolder":
        from robustbench_ft.convert.imagefolder import write_imagefolder_shards

        classes = None
        if args.dataset:
            from robustbench_ft.datasets.registry import get_dataset

            classes = get_dataset(args.dataset).shard_classes
        if src is None or out is None:
            raise ValueError("shard imagefolder needs SRC and OUT: robustbench-ft shard imagefolder SRC OUT")
        manifest = write_imagefolder_shards(src, out, name=args.name, samples_per_shard=args.samples_per_shard,
                                            resize_shorter=args.resize_shorter, image_format=args.image_format or "jpg",
                                            workers=args.workers, on_bad=args.on_bad, shuffle_seed=args.shuffle_seed,
                                            progress=True, classes=classes)
    else:
        from robustbench_ft.convert.engine import convert_dataset
        from robustbench_ft.convert.sources import ConvertOptions
        from robustbench_ft.datasets.registry import get_dataset

        spec = get_dataset(args.format)
        if src is None:
            raise ValueError(f"shard {spec.name} needs the official download: --src RAW (see datasets/README.md)")
        out = out or spec.path(Path(args.data_root), args.split)
        options = ConvertOptions(samples_per_shard=args.samples_per_shard, image_format=args.image_format or "keep",
                                 resize_shorter=args.resize_shorter, border_crop=args.border_crop,
                                 workers=args.workers, on_bad=args.on_bad,
                                 allow_count_mismatch=args.allow_count_mismatch)
        manifest = convert_dataset(spec, src, out, args.split, options)
    skipped = manifest.metadata.get("num_skipped", 0)
    print(f"wrote {manifest.num_samples} samples of {len(manifest.classes)} classes in {len(manifest.shards)} "
          f"shard(s) to {out}" + (f"; skipped {skipped} unreadable file(s), listed in its manifest" if skipped else ""))
    return 0


def cmd_import_wds(args: argparse.Namespace, src: str | None, out: str | None) -> int:
    """`shard import-wds SRC --dataset NAME`: a CLIP_benchmark-layout copy (directory or URL) as verified shards."""
    from robustbench_ft.convert.sources import ConvertOptions
    from robustbench_ft.datasets.hub_copies import import_hub_copy
    from robustbench_ft.datasets.registry import get_dataset

    misplaced = [flag for flag, value in {"--name": args.name, "--shuffle-seed": args.shuffle_seed,
                                          "--resize-shorter": args.resize_shorter}.items() if value is not None]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: not for `shard import-wds` (it keeps the copy's images)")
    if src is None or args.dataset is None:
        raise ValueError("shard import-wds needs SRC and --dataset: robustbench-ft shard import-wds "
                         "https://huggingface.co/datasets/clip-benchmark/wds_imagenet-a/tree/main --dataset imagenet-a "
                         "(the accepted copies: README, 'Hub copies')")
    out = Path(out) if out is not None else get_dataset(args.dataset).path(Path(args.data_root), args.split)
    options = ConvertOptions(samples_per_shard=args.samples_per_shard, image_format=args.image_format or "keep",
                             border_crop=args.border_crop, workers=args.workers, on_bad=args.on_bad,
                             allow_count_mismatch=args.allow_count_mismatch)
    regions = [r.strip() for r in args.region_names.split(",") if r.strip()] if args.region_names else None
    manifest = import_hub_copy(str(src), out, args.dataset, args.split, options, region_names=regions,
                               fmow_metadata=args.fmow_metadata, keep_source=args.keep_source)
    source = manifest.metadata["imported_from"]
    pinned = (f"; hub revision {source['revision']}" + ("" if source.get("pinned") else " (a branch, not pinned)")
              if source.get("revision") else "")
    print(f"imported {manifest.num_samples} samples of {len(manifest.classes)} classes in {len(manifest.shards)} "
          f"shard(s) to {out}{pinned}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from robustbench_ft.datasets.build import check_class_list
    from robustbench_ft.datasets.registry import get_dataset, list_datasets
    from robustbench_ft.shards.verify import verify_shards

    manifest = verify_shards(args.directory, check_hashes=True)
    # the dataset: named, else the one the manifest was built for, else the folder above the split's
    # (<data-root>/<dataset>/<split>), whichever is registered
    registered = {d.name for d in list_datasets()}
    guesses = (manifest.metadata.get("dataset"), Path(args.directory).resolve().parent.name)
    name = args.dataset or next((g for g in guesses if isinstance(g, str) and g in registered), None)
    if name is not None:
        check_class_list(get_dataset(name), manifest, Path(args.directory))
    print(f"ok: {manifest.num_samples} samples, {len(manifest.classes)} classes, {len(manifest.shards)} shard(s); "
          "sizes and sha256 match the manifest" + (f"; the classes match dataset {name!r}" if name else
                                                   "; class list not checked (no registered dataset named: pass "
                                                   "--dataset NAME)"))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    lp = sub.add_parser("list", help="list methods, datasets, suites or models")
    lp.set_defaults(handler=cmd_list)
    lp.add_argument("what", choices=["methods", "datasets", "suites", "models"])
    lp.add_argument("--data-root", default=RunConfig.data_root)
    sp = sub.add_parser("shard", help="convert a dataset to verified WebDataset shards",
                        description="`shard imagefolder SRC OUT` converts any SRC/<class>/<image> tree; `shard DATASET "
                                    "--src RAW [--split S] [--out DIR]` converts a registered dataset's official "
                                    "download (layouts: datasets/README.md); `shard import-wds SRC --dataset NAME` "
                                    "imports a CLIP_benchmark/DataComp WebDataset copy from a directory or URL "
                                    "(README: 'Hub copies'). Rerunning a killed conversion resumes it.")
    sp.set_defaults(handler=cmd_shard)
    sp.add_argument("format", help="imagefolder, import-wds, or a dataset name (robustbench-ft list datasets)")
    sp.add_argument("src_path", nargs="?", metavar="SRC", help="source folder or, for import-wds, URL (or --src)")
    sp.add_argument("out_path", nargs="?", type=Path, metavar="OUT", help="output folder (or --out)")
    sp.add_argument("--src", default=None, help="the official download (or ImageFolder tree, or hub copy)")
    sp.add_argument("--out", type=Path, default=None, help="default for a dataset: DATA_ROOT/<dataset>/<split>")
    sp.add_argument("--region-names", default=None,
                    help="import-wds fmow-ood: WILDS' FMoW region names in index order, comma-separated")
    sp.add_argument("--fmow-metadata", type=Path, default=None,
                    help="import-wds fmow-ood: fmow_v1.1 folder with rgb_metadata.csv and country_code_mapping.csv, "
                         "from which WILDS' region order is rebuilt")
    sp.add_argument("--keep-source", action="store_true",
                    help="import-wds: keep the downloaded source tars (OUT/.wds-source/) after the import")
    sp.add_argument("--split", default="test", help="dataset split to convert (default: test)")
    sp.add_argument("--data-root", default=RunConfig.data_root)
    sp.add_argument("--name", default=None, help="shard name prefix (imagefolder)")
    sp.add_argument("--dataset", default=None,
                    help="the registered dataset the source is: for imagefolder, class folders get its label order "
                         "(not the alphabetical one); for import-wds, the copy's dataset (e.g. imagenet-a)")
    sp.add_argument("--samples-per-shard", type=int, default=1000)
    sp.add_argument("--resize-shorter", type=int, default=None, help="resize so the shorter side is N px")
    sp.add_argument("--image-format", choices=["jpg", "png", "webp", "keep"], default=None,
                    help="default: jpg for imagefolder; keep (the source bytes) for datasets")
    sp.add_argument("--border-crop", type=int, default=None,
                    help="pixels to cut from every image edge before resizing "
                         "(default: the dataset's, ObjectNet 2; 0 = off)")
    sp.add_argument("--allow-count-mismatch", action="store_true",
                    help="convert a download whose image count (or class folders) differs from the official release")
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--on-bad", choices=["error", "skip"], default="error",
                    help="unreadable images: stop with an error naming the file, or skip and count them")
    sp.add_argument("--shuffle-seed", type=int, default=None,
                    help="shuffle files before sharding (for training splits, so streaming readers such as webdataset see "
                         "mixed classes; the harness itself trains in a random order either way)")
    vp = sub.add_parser("verify", help="re-check a shard set against its manifest (counts, classes, sha256)")
    vp.add_argument("directory", type=Path)
    vp.add_argument("--dataset", default=None, help="also check the class list against this registered dataset "
                                                    "(default: the one the manifest was built for, else the "
                                                    "folder's parent name, if registered)")
    vp.set_defaults(handler=cmd_verify)
