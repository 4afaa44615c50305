"""Write shard datasets: same as `dsvit shards {imagefolder,npz,synthetic} ...`.

    python tools/make_shards.py imagefolder SRC_DIR OUT_DIR [--split NAME] [--val-labels FILE ...]
    python tools/make_shards.py npz FILE.npz OUT_DIR --split NAME --images KEY --labels KEY
"""
import argparse
import sys

from dsvit.data.cli import add_shards_parser

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="make_shards")
    add_shards_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["shards"] + sys.argv[1:])
    sys.exit(args.func(args))
