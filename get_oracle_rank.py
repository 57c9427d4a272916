"""Taylor oracle ranks of every prunable channel (docs/ranking.md).

    python get_oracle_rank.py -c config/oracle_rank.config [--KEY VALUE ...] [--shard I/N]
    python get_oracle_rank.py --merge OUT.npz SHARD.npz [SHARD.npz ...]

With --shard I/N only every N-th record from the I-th is ranked and the result
goes to rank_save with '.shardIofN' before the extension; --merge sums shard
files into one rank file.
"""

import argparse
import os
import re
import sys

from common.errors import UserError
from netcompress.checkpoint_paths import input_checkpoint_files
from netcompress.cli import run_main, run_script
from common.outputs import check_outputs
from common.runtime import graph_mode
from netcompress.sharding import parse_shard, shard_output_path

SHARD_NAME = re.compile(r"\.shard\d+of\d+(\.|$)")

DESCRIPTION = ("Compute the Taylor oracle rank of every prunable channel over test_data "
               "(one pass) and save it to rank_save; --KEY VALUE or --set KEY=VALUE "
               "overrides any config key. To merge shard files: "
               "get_oracle_rank.py --merge OUT.npz SHARD.npz [SHARD.npz ...]")


def add_shard_argument(parser):
    parser.add_argument("--shard", metavar="I/N",
                        help="rank only shard I of N (every N-th record from the I-th); "
                             "writes rank_save with .shardIofN before the extension")


def merge_main(argv):
    parser = argparse.ArgumentParser(
        prog="get_oracle_rank.py",
        description="Sum shard rank files of one model into one rank file.")
    parser.add_argument("--merge", nargs="+", required=True, metavar=("OUT", "SHARD"),
                        help="the output rank file, then the shard rank files")
    args = parser.parse_args(argv)
    if len(args.merge) < 2:
        parser.error("--merge needs the output file and at least one shard file")
    output, shards = args.merge[0], args.merge[1:]
    if SHARD_NAME.search(os.path.basename(output)):
        raise UserError(f"--merge {output}: the output comes first, and this looks like a "
                        f"shard file; give OUT.npz, then the shards")
    check_outputs({"--merge OUT": [output]}, {"shard": shards})
    graph_mode()
    from netcompress.ranking import merge_shards, summary_table

    merged = merge_shards(shards)
    merged.save(output)
    for line in summary_table(merged):
        print(line)
    print(f"saved {output} ({merged.count} examples from {len(shards)} shard file(s))")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--merge" in argv:
        return merge_main(argv)
    return run_script(argv, "oracle_rank", DESCRIPTION, _rank,
                      add_arguments=add_shard_argument, check=_check)


def _check(config, args):
    """The shard and the output, before the ranking pass rather than after."""
    shard = parse_shard(args.shard) if args.shard is not None else None
    output = shard_output_path(config["rank_save"], shard)
    inputs = {key: [config[key]] for key in ("test_data", "model_def", "mask") if config[key]}
    inputs["checkpoint"] = input_checkpoint_files(config["checkpoint"])
    check_outputs({"rank_save": [output]}, inputs)
    return shard, output


def _rank(config, args, prepared):
    from netcompress.ranking import rank, summary_table

    shard, output = prepared
    sums = rank(config, shard)
    sums.save(output)
    for line in summary_table(sums):
        print(line)
    print(f"checkpoint: {sums.metadata['checkpoint']}")
    print(f"saved {output} ({sums.count} examples, shard {sums.metadata['shard']})")


if __name__ == "__main__":
    sys.exit(run_main(main))
