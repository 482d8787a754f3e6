"""`dilatedseg prepare <dataset>`: generate or convert a dataset into the layout it loads.

    dilatedseg prepare shapes --root data/shapes          generate the synthetic dataset
    dilatedseg prepare voc --root data/voc                SBD .mat -> PNG, train_aug list
    dilatedseg prepare camvid --root data/camvid [--layout original --splits DIR]
    dilatedseg prepare kitti --root data/kitti [--layout semantics]
    dilatedseg prepare cityscapes --root data/cityscapes  labelIds -> labelTrainIds

Each verb ends by reading every image and label of the train and val splits (and CamVid's
and KITTI semantics' test split; a missing split stops it) with the data module's own checks
(files present, sizes equal, label values in range), so a missing or malformed file is
reported here rather than when training starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dilatedseg.data import (
    CamVidDataModule,
    CityscapesDataModule,
    DataError,
    KITTIDataModule,
    SegmentationDataModule,
    ShapesDataModule,
    VOCDataModule,
)


def checking(module_class: type[SegmentationDataModule], **options) -> SegmentationDataModule:
    """A data module that checks every label (``label_check="all"``) and whose messages name
    prepare's options (--root=, --layout=) where a folder or layout nearby holds the tree."""
    module = module_class(label_check="all", **options)
    module.option_prefix = "--"
    return module


def converted(module: SegmentationDataModule, convert, holds=None) -> None:
    """``convert(root)``; a tree it cannot find under the root, where a folder nearby holds
    the files (the val split's, or what ``holds(module)`` says: see ``nearby_tree``), names
    that folder."""
    try:
        convert(module.root)
    except DataError as error:
        raise module.elsewhere(error, "val", holds) from None


def report(module: SegmentationDataModule, splits: tuple[str, ...]) -> None:
    """Read every labelled image and label of ``splits`` (sizes, label values: what setup
    checks before training) and print the counts; raises DataError naming a broken file."""
    counts = []
    for split in splits:
        print(f"checking every file of {module.name} {split} ...", flush=True)
        counts.append(f"{split} {len(module.make_dataset(split, labelled=False))}")
    print(f"{module.name} ready under {module.root}: " + ", ".join(counts))


def prepare_shapes(args: argparse.Namespace) -> None:
    module = ShapesDataModule(root=args.root, seed=args.seed)
    module.option_prefix = "--"
    module.prepare_data()
    print(f"shapes dataset ready under {module.root}")


def prepare_voc(args: argparse.Namespace) -> None:
    from dilatedseg.prepare.voc import prepare_voc

    module = checking(VOCDataModule, root=args.root)
    converted(module, prepare_voc)
    report(module, ("train", "val"))


def prepare_camvid(args: argparse.Namespace) -> None:
    module = checking(CamVidDataModule, root=args.root, layout=args.layout)
    if args.layout == "original":
        from dilatedseg.prepare.camvid import convert_original, holds_release

        splits = Path(args.splits) if args.splits else None
        converted(module, lambda root: convert_original(root, splits), holds_release)
    report(module, ("train", "val", "test"))


def prepare_kitti(args: argparse.Namespace) -> None:
    splits = ("train", "val") if args.layout == "ros" else ("train", "val", "test")
    report(checking(KITTIDataModule, root=args.root, layout=args.layout,
                    val_every=args.val_every), splits)


def prepare_cityscapes(args: argparse.Namespace) -> None:
    from dilatedseg.prepare.cityscapes import prepare_cityscapes

    module = checking(CityscapesDataModule, root=args.root)
    converted(module, prepare_cityscapes)
    report(module, ("train", "val"))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dilatedseg prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="dataset", required=True)
    shapes = verbs.add_parser("shapes", help="generate the embedded synthetic dataset")
    shapes.add_argument("--root", default="data/shapes")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.set_defaults(run=prepare_shapes)

    from dilatedseg.prepare.voc import __doc__ as voc_doc

    voc = verbs.add_parser("voc", help="Pascal VOC 2012 + SBD: convert SBD, write train_aug.txt",
                           description=voc_doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    voc.add_argument("--root", default="data/voc", help="folder holding VOCdevkit/ and "
                     "benchmark_RELEASE/")
    voc.set_defaults(run=prepare_voc)

    camvid = verbs.add_parser("camvid", help="CamVid: check the SegNet copy or convert the "
                              "original 32-class colour labels")
    camvid.add_argument("--root", default="data/camvid")
    camvid.add_argument("--layout", choices=("segnet", "original"), default="segnet")
    camvid.add_argument("--splits", default=None, help="original layout: folder with SegNet's "
                        "train.txt / val.txt / test.txt")
    camvid.set_defaults(run=prepare_camvid)

    kitti = verbs.add_parser("kitti", help="KITTI: check the Ros et al. or semantics tree")
    kitti.add_argument("--root", default="data/kitti")
    kitti.add_argument("--layout", choices=("ros", "semantics"), default="ros")
    kitti.add_argument("--val_every", type=int, default=5, help="semantics layout: every n-th "
                       "training image is held out for validation (as --data.init_args.val_every)")
    kitti.set_defaults(run=prepare_kitti)

    cityscapes = verbs.add_parser("cityscapes", help="Cityscapes: write *_labelTrainIds.png")
    cityscapes.add_argument("--root", default="data/cityscapes",
                            help="folder holding leftImg8bit/ and gtFine/")
    cityscapes.set_defaults(run=prepare_cityscapes)
    args = parser.parse_args(argv)
    args.run(args)
