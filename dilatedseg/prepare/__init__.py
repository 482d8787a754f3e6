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
    KITTIDataModule,
    SegmentationDataModule,
    ShapesDataModule,
    VOCDataModule,
)


def report(module: SegmentationDataModule, splits: tuple[str, ...]) -> None:
    """Read every labelled image and label of ``splits`` (sizes, label values: what setup
    checks before training; the module is made with ``label_check="all"``) and print the
    counts; raises DataError naming a broken file, or the --root / --layout that holds the
    tree when they are off."""
    module.option_prefix = "--"
    counts = []
    for split in splits:
        print(f"checking every file of {module.name} {split} ...", flush=True)
        counts.append(f"{split} {len(module.make_dataset(split, labelled=False))}")
    print(f"{module.name} ready under {module.root}: " + ", ".join(counts))


def prepare_shapes(args: argparse.Namespace) -> None:
    module = ShapesDataModule(root=args.root, seed=args.seed)
    module.prepare_data()
    print(f"shapes dataset ready under {module.root}")


def prepare_voc(args: argparse.Namespace) -> None:
    from dilatedseg.prepare.voc import prepare_voc

    prepare_voc(Path(args.root))
    report(VOCDataModule(root=args.root, label_check="all"), ("train", "val"))


def prepare_camvid(args: argparse.Namespace) -> None:
    if args.layout == "original":
        from dilatedseg.prepare.camvid import convert_original

        convert_original(Path(args.root), Path(args.splits) if args.splits else None)
    report(CamVidDataModule(root=args.root, layout=args.layout, label_check="all"),
           ("train", "val", "test"))


def prepare_kitti(args: argparse.Namespace) -> None:
    splits = ("train", "val") if args.layout == "ros" else ("train", "val", "test")
    report(KITTIDataModule(root=args.root, layout=args.layout, label_check="all"), splits)


def prepare_cityscapes(args: argparse.Namespace) -> None:
    from dilatedseg.prepare.cityscapes import prepare_cityscapes

    prepare_cityscapes(Path(args.root))
    report(CityscapesDataModule(root=args.root, label_check="all"), ("train", "val"))


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
    kitti.set_defaults(run=prepare_kitti)

    cityscapes = verbs.add_parser("cityscapes", help="Cityscapes: write *_labelTrainIds.png")
    cityscapes.add_argument("--root", default="data/cityscapes",
                            help="folder holding leftImg8bit/ and gtFine/")
    cityscapes.set_defaults(run=prepare_cityscapes)
    args = parser.parse_args(argv)
    args.run(args)
