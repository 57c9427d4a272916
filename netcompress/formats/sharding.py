"""Sharded ranking passes: which records a shard holds and where it goes.
No TensorFlow, so scripts can check paths before importing it."""

import os
import re

from common.errors import UserError

ALL_RECORDS = "all"  # the ``shard`` metadata of an unsharded pass


def parse_shard(text):
    """'I/N' -> (I, N) with 0 <= I < N."""
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not found:
        raise UserError(f"--shard must be I/N (e.g. 0/4), got {text!r}")
    index, count = int(found.group(1)), int(found.group(2))
    if count < 1:
        raise UserError(f"--shard {text}: the shard count must be at least 1")
    if index >= count:
        raise UserError(f"--shard {text}: the index must be in 0..{count - 1}")
    return index, count


def shard_label(shard):
    return ALL_RECORDS if shard is None else f"{shard[0]}/{shard[1]}"


def shard_output_path(rank_save, shard):
    """rank_save for a whole pass; 'runs/rank.npz' -> 'runs/rank.shard0of2.npz'
    for shard (0, 2), so that shards never overwrite each other."""
    if shard is None:
        return rank_save
    stem, extension = os.path.splitext(rank_save)
    return f"{stem}.shard{shard[0]}of{shard[1]}{extension or '.npz'}"


def records_in_shard(total, shard):
    """Examples that eval_dataset's shard (index, count) keeps out of ``total``."""
    if shard is None:
        return total
    index, count = shard
    return len(range(index, total, count))
