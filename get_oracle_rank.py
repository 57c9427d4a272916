"""Taylor oracle ranks of every prunable channel (docs/ranking.md).

    python get_oracle_rank.py -c config/oracle_rank.config [--KEY VALUE ...] [--shard I/N]
    python get_oracle_rank.py --merge OUT.npz SHARD.npz [SHARD.npz ...]
    python get_oracle_rank.py -c CONFIG --compare [--fractions 0.05 0.1 0.2] [--oracle LAYER ...]

With --shard I/N only every N-th record from the I-th is ranked and the result
goes to rank_save with '.shardIofN' before the extension; --merge sums shard
files into one rank file. --compare judges every criterion of the rank file
at rank_save by the validation mIoU (val_data) after removing each fraction
of every prunable layer (docs/ranking.md, "Comparing criteria").
"""

import argparse
import os
import re
import sys

from common.digests import checkpoint_digest, checkpoint_line, records_line, short
from common.errors import UserError
from netcompress.formats.checkpoint_paths import input_checkpoint_files
from netcompress.settings.cli import run_main, run_script
from common.outputs import check_outputs
from common.runtime import graph_mode
from netcompress.jobs.compare import DEFAULT_FRACTIONS, check_fractions, output_paths
from netcompress.formats.sharding import parse_shard, shard_output_path

SHARD_NAME = re.compile(r"\.shard\d+of\d+(\.|$)")

DESCRIPTION = ("Compute the Taylor oracle rank of every prunable channel over test_data "
               "(one pass) and save it to rank_save; --KEY VALUE or --set KEY=VALUE "
               "overrides any config key. To merge shard files: "
               "get_oracle_rank.py --merge OUT.npz SHARD.npz [SHARD.npz ...]")


def add_arguments(parser):
    parser.add_argument("--shard", metavar="I/N",
                        help="rank only shard I of N (every N-th record from the I-th); "
                             "writes rank_save with .shardIofN before the extension")
    parser.add_argument("--compare", action="store_true",
                        help="instead of ranking: validation mIoU (val_data) of each "
                             "criterion of the rank file after removing each fraction of "
                             "every prunable layer; writes a table, CSV and plot beside "
                             "rank_save")
    parser.add_argument("--fractions", type=float, nargs="+", metavar="F",
                        default=list(DEFAULT_FRACTIONS),
                        help="with --compare: fractions removed (default 0.05 0.1 0.2)")
    parser.add_argument("--oracle", nargs="+", metavar="LAYER", default=[],
                        help="with --compare: the true loss change of removing each "
                             "channel of these layers, and each criterion's Spearman "
                             "correlation with it")
    parser.add_argument("--streams", action="store_true",
                        help="with --compare: remove the fractions from the residual "
                             "streams (block1/residual ...) too")


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
    from netcompress.jobs.rank import merge_shards, summary_table

    merged = merge_shards(shards)
    merged.save(output)
    for line in summary_table(merged):
        print(line)
    print(f"ranks checkpoint {merged.metadata['checkpoint']} (sha256 "
          f"{short(merged.metadata['checkpoint_sha256'])}) on {merged.metadata['data']} (sha256 "
          f"{short(merged.metadata['data_sha256'])}), as the shards record")
    print(f"saved {output} ({merged.count} examples from {len(shards)} shard file(s))")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--merge" in argv:
        return merge_main(argv)
    return run_script(argv, "oracle_rank", DESCRIPTION, _run, add_arguments=add_arguments,
                      check=_check)


def _check(config, args):
    if args.compare:
        return _check_compare(config, args)
    if args.oracle or args.streams or args.fractions != list(DEFAULT_FRACTIONS):
        raise UserError("--fractions, --oracle and --streams go with --compare")
    return _check_rank(config, args)


def _check_compare(config, args):
    """val_data given and held out, the rank file there, the outputs writable."""
    if args.shard is not None:
        raise UserError("--compare evaluates the whole of val_data: drop --shard")
    if config["val_data"] is None:
        raise UserError("--compare needs val_data: held-out validation records (never "
                        "the test records, and not test_data, the ranking data)")
    if os.path.realpath(config["val_data"]) == os.path.realpath(config["test_data"]):
        raise UserError(f"val_data {config['val_data']!r} is the ranking data (test_data): "
                        f"give held-out validation records")
    if not os.path.isfile(config["rank_save"]):
        raise UserError(f"rank_save {config['rank_save']!r} not found: rank first "
                        f"(get_oracle_rank.py -c CONFIG), then --compare")
    check_fractions(args.fractions)
    written = output_paths(config["rank_save"])
    inputs = {key: [config[key]] for key in ("val_data", "model_def", "mask", "rank_save")
              if config[key]}
    inputs["checkpoint"] = input_checkpoint_files(config["checkpoint"])
    check_outputs({"--compare CSV": [written[0]], "--compare plot": [written[1]]}, inputs)
    return written


def _run(config, args, prepared):
    from netcompress.graphs.models import with_checkpoint_model

    config = with_checkpoint_model(config)  # model_def, mask, num_classes: the checkpoint's
    return (_compare if args.compare else _rank)(config, args, prepared)


def _compare(config, args, written):
    from netcompress.formats.checkpoint_paths import resolve_checkpoint
    from netcompress.jobs.compare import compare, table, write_csv, write_plot
    from netcompress.formats.rankfile import load_ranks
    from netcompress.graphs.models import model_architecture

    ranks = load_ranks(config["rank_save"], config["checkpoint_model"].model_def,
                       config["num_classes"], model_architecture(config["model"]))
    checkpoint = resolve_checkpoint(config["checkpoint"])
    digest = checkpoint_digest(checkpoint)
    if ranks.metadata["checkpoint_sha256"]:
        ranks.check_checkpoint(checkpoint, digest)
    elif os.path.realpath(ranks.metadata["checkpoint"]) != os.path.realpath(checkpoint):
        raise UserError(f"rank_save {config['rank_save']} ranks checkpoint "
                        f"{ranks.metadata['checkpoint']}, not {checkpoint}: rank this one first")
    config = dict(config, checkpoint=checkpoint)  # the one compared is the one printed
    print(checkpoint_line(checkpoint))
    result = compare(config, ranks, args.fractions, args.oracle, streams=args.streams)
    print(records_line("val_data", config["val_data"], result["examples"]))
    for line in table(result):
        print(line)
    write_csv(result, written[0])
    write_plot(result, written[1])
    print(f"saved {written[0]} and {written[1]}")


def _check_rank(config, args):
    """The shard and the output, before the ranking pass rather than after."""
    shard = parse_shard(args.shard) if args.shard is not None else None
    output = shard_output_path(config["rank_save"], shard)
    inputs = {key: [config[key]] for key in ("test_data", "model_def", "mask") if config[key]}
    inputs["checkpoint"] = input_checkpoint_files(config["checkpoint"])
    check_outputs({"rank_save": [output]}, inputs)
    return shard, output


def _rank(config, args, prepared):
    from netcompress.jobs.rank import rank, summary_table

    shard, output = prepared
    sums = rank(config, shard)
    sums.save(output)
    for line in summary_table(sums):
        print(line)
    print(checkpoint_line(sums.metadata["checkpoint"]))
    print(records_line("test_data", sums.metadata["data"], sums.count)
          + ("" if shard is None else f", shard {sums.metadata['shard']}"))
    print(f"saved {output} ({sums.count} examples, shard {sums.metadata['shard']})")


if __name__ == "__main__":
    sys.exit(run_main(main))
