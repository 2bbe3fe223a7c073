"""The `mnistlab` command: parses arguments, calls the library, prints. Nothing else lives here.

    mnistlab data list                      where each dataset is (or "not present")
    mnistlab data fetch fashion-mnist       download and verify into ~/.cache/mnistlab
    mnistlab data verify mnist              hash and header of every file (exit 0 or 2)
    mnistlab data show digits -o grid.png   a labelled grid of samples
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mnistlab.errors import UserError


def _add_data_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR", help="a folder holding the four standard IDX files "
                   "(gzipped or not); searched before everything else")
    p.add_argument("--offline", action="store_true", help="never download; fail with the offline "
                   "choices when the dataset is not on disk")


def cmd_data_list(args: argparse.Namespace) -> int:
    from mnistlab.data.registry import DATASETS
    from mnistlab.data.resolve import find_present

    rows = [("name", "size", "where", "source")]
    for spec in DATASETS.values():
        if spec.is_idx:
            present = find_present(spec)
            where = f"{present[1]} ({present[0]})" if present else "not present"
            size = f"{spec.download_bytes / 1e6:.1f} MB"
        else:
            where, size = "bundled with scikit-learn", "1,797 images"
        rows.append((spec.name, size, where, spec.source))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    print("\nSearch order: --data-dir, $MNISTLAB_DATA/<name>, ~/.cache/mnistlab/<name>, "
          "/usr/share/datasets/<name>, then a download (unless --offline).")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from mnistlab.data.registry import get_spec
    from mnistlab.data.resolve import locate

    spec = get_spec(args.name)
    if not spec.is_idx:
        print(f"{spec.name}: bundled with scikit-learn; nothing to download")
        return 0
    label, folder = locate(spec, offline=args.offline)
    print(f"{spec.name}: {folder} ({label}, verified)")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnistlab.data.registry import get_spec
    from mnistlab.data.resolve import find_present, verify_folder

    spec = get_spec(args.name)
    if not spec.is_idx and args.data_dir is None:
        from mnistlab.data.dataset import load_dataset

        ds = load_dataset(spec.name)
        n_train, n_test = len(ds.train_labels) + len(ds.val_labels), len(ds.test_labels)
        ok = (n_train, n_test) == (spec.train_count, spec.test_count)
        print(f"{spec.name}: {n_train} train + {n_test} test images: {'OK' if ok else 'UNEXPECTED'}")
        return 0 if ok else 2
    if args.data_dir is not None:
        folder = Path(args.data_dir).expanduser()
        if not folder.is_dir():
            raise UserError(f"--data-dir {folder}: no such folder")
    else:
        present = find_present(spec)
        if present is None:
            raise UserError(f"{spec.name}: not present on this machine; `mnistlab data fetch "
                            f"{spec.name}` downloads it, `mnistlab data list` shows where we look")
        folder = present[1]
    checks = verify_folder(folder, spec if spec.is_idx else None)
    print(f"{spec.name}: {folder}")
    for c in checks:
        print(f"  {'OK  ' if c.ok else 'FAIL'} {c.path.name}: {c.detail}")
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} files verified")
    return 0 if failed == 0 else 2


def cmd_data_show(args: argparse.Namespace) -> int:
    from mnistlab.data.dataset import load_dataset
    from mnistlab.plots import sample_grid

    ds = load_dataset(args.name, data_dir=args.data_dir, offline=args.offline)
    images, labels = ds.split(args.split)
    out = sample_grid(images.numpy(), labels.numpy(), ds.classes, args.output,
                      title=f"{ds.name} ({args.split}, {len(labels):,} images)",
                      per_class=args.per_class, seed=args.seed)
    print(ds.summary())
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnistlab",
        description="A deep-learning lab around MNIST and its family: data, models, training, "
                    "and no black boxes.",
    )
    from mnistlab import __version__

    parser.add_argument("--version", action="version", version=f"mnistlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="list, fetch, verify and show datasets",
                          description="Datasets: mnist, fashion-mnist, kmnist (IDX, 60k/10k) and "
                                      "digits (scikit-learn's bundled 8x8 digits, no download).")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = dsub.add_parser("list", help="each dataset, its size and where it was found")
    p.set_defaults(func=cmd_data_list)

    p = dsub.add_parser("fetch", help="download a dataset into the cache and verify it")
    p.add_argument("name", help="dataset name (see `mnistlab data list`)")
    p.add_argument("--offline", action="store_true", help="only check what is on disk")
    p.set_defaults(func=cmd_data_fetch)

    p = dsub.add_parser("verify", help="check the hash and IDX header of every file (exit 0 or 2)")
    p.add_argument("name", help="dataset name whose hashes to check against")
    p.add_argument("--data-dir", metavar="DIR", help="verify this folder instead of the one found")
    p.set_defaults(func=cmd_data_verify)

    p = dsub.add_parser("show", help="save a labelled grid of samples as a PNG")
    p.add_argument("name", help="dataset name (see `mnistlab data list`)")
    p.add_argument("-o", "--output", default="grid.png", help="PNG file to write (default: grid.png)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train",
                   help="which split to sample from (default: train)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="which samples to draw (default: 0)")
    _add_data_source_flags(p)
    p.set_defaults(func=cmd_data_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"mnistlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mnistlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
