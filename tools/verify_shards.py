"""Check a shard dataset: same as `dsvit shards verify OUT_DIR` (exit status 1 if anything is wrong)."""
import argparse
import sys

from dsvit.data.cli import add_shards_parser

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="verify_shards")
    add_shards_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["shards", "verify"] + sys.argv[1:])
    sys.exit(args.func(args))
