"""`dilatedseg prepare <dataset>`: generate or convert a dataset into the layout it loads."""

from __future__ import annotations

import argparse

from dilatedseg.data import ShapesDataModule


def prepare_shapes(args: argparse.Namespace) -> None:
    module = ShapesDataModule(root=args.root, seed=args.seed)
    module.prepare_data()
    print(f"shapes dataset ready under {module.root}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dilatedseg prepare", description=__doc__)
    verbs = parser.add_subparsers(dest="dataset", required=True)
    shapes = verbs.add_parser("shapes", help="generate the embedded synthetic dataset")
    shapes.add_argument("--root", default="data/shapes")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.set_defaults(run=prepare_shapes)
    args = parser.parse_args(argv)
    args.run(args)
