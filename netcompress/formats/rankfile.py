"""The rank file written by get_oracle_rank.py and read by prun_model.py.

An ``.npz`` (loads with allow_pickle=False) holding, for every prunable layer
(in the architecture's order):

- ``taylor/<layer>``:     sum over examples n of |t_n(k)|      (float64 [channels])
- ``reference/<layer>``:  sum over examples n of  t_n(k)       (signed, float64)
- ``taylor_out/<layer>``: sum over examples n of |t_out_n(k)|  (float64)
- ``l1/<layer>``:         the l1 norm of each filter (the checkpoint's, not a sum)
- ``score/<criterion>/<layer>``: each criterion's final per-channel score
  (float64, higher = keep), written for readers with numpy alone

with t_n(k) = spatial mean of z * dC/dz (z: the conv's output before batch
norm) and t_out_n(k) = spatial sum of a * dC/da (a: what the layer's
consumers read) for channel k of example n (docs/ranking.md), plus ``layers``
(names), ``count`` (examples summed) and metadata strings. Sums, not means,
so shard files add up exactly; scores divide by ``count``. Format 1 files
(taylor and reference only) still load for those two criteria.
"""

import hashlib
import json
import os
import zipfile
import zlib

import numpy as np

from common.errors import UserError, one_line
from common.files import numpy_file_kind, replace_atomically
from models.architecture import adapnet_pp, resolve_widths
from netcompress.pruning_math.criteria import CRITERIA
from netcompress.pruning_math.scores import normalised_scores

# What numpy's zip and .npy readers raise on a truncated or damaged file.
_DAMAGED_ARCHIVE = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)

# The additive sums a rank file stores per layer (shards add them up).
SUMS = ("taylor", "reference", "taylor_out")
FORMAT_VERSION = 2
METADATA_KEYS = ("model_def_json", "model_def_sha256", "masks_json", "checkpoint", "data",
                 "shard")
# The content digests (common/digests.py) of the checkpoint ranked and the
# record file read; files written before them lack these keys ("" when loaded).
DIGEST_KEYS = ("checkpoint_sha256", "data_sha256")


def model_def_digest(model_def):
    return hashlib.sha256(json.dumps(model_def, sort_keys=True).encode()).hexdigest()


class RankSums:
    """Accumulated per-layer sums (SUMS), the filters' l1 norms and the
    example count; every criterion is computed from these (CRITERIA)."""

    def __init__(self, layers, widths):
        self.layers = list(layers)
        self.widths = {name: int(widths[name]) for name in self.layers}
        self.sums = {kind: {name: np.zeros(widths[name], np.float64) for name in self.layers}
                     for kind in SUMS}
        self.l1 = {name: np.zeros(widths[name], np.float64) for name in self.layers}
        self.count = 0
        self.format_version = FORMAT_VERSION
        self.metadata = {key: "" for key in METADATA_KEYS + DIGEST_KEYS}
        self.path = None  # where it was loaded from, for messages

    def sum_of(self, kind, layer):
        """An additive sum; a one-line error when the file predates it."""
        values = self.sums[kind][layer]
        if values is None:
            raise UserError(f"rank file {self.path} (format {self.format_version}) has no "
                            f"{kind} values: regenerate it with get_oracle_rank.py")
        return values

    def l1_of(self, layer):
        if self.l1[layer] is None:
            raise UserError(f"rank file {self.path} (format {self.format_version}) has no "
                            f"filter norms (l1): regenerate it with get_oracle_rank.py")
        return self.l1[layer]

    def add(self, kind, layer, values):
        self.sums[kind][layer] += values

    def scores(self, criterion):
        """{layer: per-channel score} of a criterion (see CRITERIA)."""
        if criterion not in CRITERIA:
            raise UserError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
        return {layer: CRITERIA[criterion](self, layer) for layer in self.layers}

    def save(self, path):
        arrays = {"layers": np.array(self.layers), "count": np.int64(self.count),
                  "format_version": np.int64(FORMAT_VERSION)}
        for sum_kind in SUMS:
            for name in self.layers:
                arrays[f"{sum_kind}/{name}"] = self.sums[sum_kind][name]
        for name in self.layers:
            arrays[f"l1/{name}"] = self.l1[name]
        for criterion in CRITERIA:
            for name, score in self.scores(criterion).items():
                arrays[f"score/{criterion}/{name}"] = np.asarray(score, np.float64)
        for key, value in self.metadata.items():
            arrays[f"meta/{key}"] = np.array(str(value))

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        replace_atomically(path, write)

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise UserError(f"rank file not found: {path}")
        not_rank = f"{path} is not a rank file (an .npz written by get_oracle_rank.py)"
        try:
            kind = numpy_file_kind(path)
            if kind not in ("npz", "npy"):
                raise UserError(f"{not_rank}: " + ("it is empty" if kind == "empty" else
                                                   "it is neither an .npz nor a .npy file"))
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise UserError(f"{not_rank}: it is a single .npy array "
                                f"({_describe(data)}; a mask file?)")
            with data:
                sums = cls._from_arrays(data, path, not_rank)
                sums.path = path
        except _DAMAGED_ARCHIVE as exc:
            raise UserError(f"{not_rank}: {one_line(exc)} (damaged or truncated?)") \
                from None
        _check_finite(sums, path)
        return sums

    @classmethod
    def _from_arrays(cls, data, path, not_rank):
        def array(key, ndim):
            if key not in data.files:
                raise UserError(f"{not_rank}: it has no array {key!r}")
            value = data[key]
            if value.ndim != ndim:
                raise UserError(f"{not_rank}: {key!r} is {_describe(value)}, expected a "
                                f"{ndim}-d array")
            return value

        layers = [str(x) for x in array("layers", 1)]
        widths = {n: array(f"taylor/{n}", 1).shape[0] for n in layers}
        sums = cls(layers, widths)
        version = int(data["format_version"]) if "format_version" in data.files else 1
        if version > FORMAT_VERSION:
            raise UserError(f"{path} is a rank file of format {version}, newer than this "
                            f"program's {FORMAT_VERSION}: update, or regenerate it")
        sums.format_version = version
        for sum_kind in SUMS:
            if sum_kind == "taylor_out" and version < 2:
                sums.sums[sum_kind] = {name: None for name in layers}
                continue
            for name in layers:
                values = array(f"{sum_kind}/{name}", 1)
                if values.shape[0] != widths[name] or values.dtype.kind not in "fiu":
                    raise UserError(f"{not_rank}: {sum_kind}/{name} is "
                                    f"{_describe(values)}, expected {widths[name]} numbers")
                sums.sums[sum_kind][name] = values.astype(np.float64)
        count = array("count", 0)
        if count.dtype.kind not in "iu" or int(count) < 0:
            raise UserError(f"{not_rank}: 'count' is {_describe(count)} {count}, expected "
                            f"a number of examples")
        sums.count = int(count)
        for name in layers:
            if version < 2:
                sums.l1[name] = None
                continue
            values = array(f"l1/{name}", 1)
            if values.shape[0] != widths[name] or values.dtype.kind not in "fiu":
                raise UserError(f"{not_rank}: l1/{name} is {_describe(values)}, expected "
                                f"{widths[name]} numbers")
            sums.l1[name] = values.astype(np.float64)
        for key in METADATA_KEYS:
            sums.metadata[key] = str(array(f"meta/{key}", 0))
        for key in DIGEST_KEYS:
            if f"meta/{key}" in data.files:
                sums.metadata[key] = str(array(f"meta/{key}", 0))
        return sums

    def check_masks(self, masks, mask_source):
        """The ranks were computed with these masks ({unit: (kept, width)})."""
        recorded = self.metadata["masks_json"]
        if not recorded:  # not written by get_oracle_rank.py
            return
        from netcompress.formats.description import masks_difference
        ranked = {unit: (entry["kept"], entry["width"])
                  for unit, entry in json.loads(recorded).items()}
        difference = masks_difference(ranked, masks or {}, "in the rank file", "in the mask")
        if difference:
            raise UserError(f"rank file {self.path} was computed with another mask than "
                            f"{mask_source}: {difference}; rerank with "
                            f"get_oracle_rank.py and this mask")

    def check_checkpoint(self, prefix, digest, log=print):
        """The ranks were computed on this checkpoint's content (``prefix``,
        its digest); a file written before digests were recorded is accepted
        with a warning (docs/ranking.md)."""
        recorded = self.metadata["checkpoint_sha256"]
        if not recorded:
            log(f"warning: rank file {self.path} records no checkpoint digest (written "
                f"before they were recorded): not checked that it ranks {prefix}")
        elif recorded != digest:
            raise UserError(f"rank file {self.path} ranks another checkpoint "
                            f"({self.metadata['checkpoint']}, sha256 {recorded[:12]}) than "
                            f"{prefix} (sha256 {digest[:12]}): rerank this checkpoint with "
                            f"get_oracle_rank.py")

    def check_model(self, widths, prunable_layers, source, streams=()):
        """The rank file covers exactly these layers with these channel counts;
        a file written before residual streams were ranked may lack all of
        ``streams`` (then pruning a stream asks to regenerate it)."""
        if self.layers != list(prunable_layers) and \
                self.layers != [n for n in prunable_layers if n not in set(streams)]:
            missing = [n for n in prunable_layers if n not in self.layers]
            extra = [n for n in self.layers if n not in prunable_layers]
            detail = (f"missing layer {missing[0]}" if missing else
                      f"unknown layer {extra[0]}" if extra else "layers in another order")
            raise UserError(f"rank file {source} does not match the model: {detail}")
        for name in self.layers:
            if self.sums["taylor"][name].shape[0] != widths[name]:
                raise UserError(f"rank file {source} does not match the model: {name} has "
                                f"{self.sums['taylor'][name].shape[0]} channels in the rank "
                                f"file but {widths[name]} in the model_def")


def _check_finite(sums, path):
    """NaN or inf sums (a ranking pass over a diverged checkpoint, a damaged
    file) would rank every channel alike; refuse them (docs/errors.md)."""
    arrays = [(f"{kind}/{name}", sums.sums[kind][name]) for kind in SUMS
              for name in sums.layers] + [(f"l1/{name}", sums.l1[name]) for name in sums.layers]
    for key, values in arrays:
        if values is not None and not np.isfinite(values).all():
            raise UserError(f"rank file {path} has scores that are not finite "
                            f"({key}): it is not usable; regenerate it "
                                f"by rerunning get_oracle_rank.py (on a checkpoint with "
                                f"finite weights)")


def masks_json(masks):
    """Masks ({unit: (kept, width)}) as the rank file records them: JSON of
    {unit: {"width": w, "kept": [indices]}} (netcompress/formats/description.py)."""
    from netcompress.formats.description import masks_json as masks_object
    return json.dumps(masks_object(masks or {}))


def _describe(array):
    return f"a {array.ndim}-d {array.dtype} array of shape {list(array.shape)}"


def merge(parts):
    """Sum loaded shard rank files of the same model into one RankSums.

    ``parts``: (path, RankSums) pairs; the paths name the files in errors.
    """
    if not parts:
        raise UserError("merge needs at least one rank file")
    first_path, first = parts[0]
    merged = RankSums(first.layers, first.widths)
    merged.metadata = dict(first.metadata)
    merged.path = "merged shards"
    for path, part in parts:
        if part.layers != merged.layers or any(
                part.sums["taylor"][n].shape != merged.sums["taylor"][n].shape
                for n in merged.layers):
            raise UserError(f"rank file {path} is for another model than {first_path}")
        if part.metadata["model_def_sha256"] != merged.metadata["model_def_sha256"]:
            raise UserError(f"rank file {path} was computed for another model_def than "
                            f"{first_path}")
        for sum_kind in SUMS:
            for name in merged.layers:
                merged.sums[sum_kind][name] += part.sum_of(sum_kind, name)
        for name in merged.layers:  # the same checkpoint's norms in every shard
            if not np.array_equal(part.l1_of(name), first.l1_of(name)):
                raise UserError(f"rank file {path} has other filter norms than "
                                f"{first_path} for {name}: not the same checkpoint")
            merged.l1[name] = first.l1_of(name)
        merged.count += part.count
    merged.metadata["shard"] = "merged: " + " + ".join(
        os.path.basename(path) for path, _ in parts)
    return merged


def load_ranks(rank_path, model_def, num_classes, architecture=None):
    """The rank file, checked to cover exactly this model's layers and channels."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    ranks = RankSums.load(rank_path)
    widths = resolve_widths(model_def, num_classes, architecture)
    ranks.check_model(widths, [g.name for g in architecture.prunable_groups(streams=True)],
                      rank_path, [g.name for g in architecture.stream_groups()])
    return ranks


def load_normalised_scores(rank_path, model_def, num_classes, criterion, normalisation,
                           architecture=None):
    """Rank file -> {layer: normalised scores or None}; the file must match the model."""
    if criterion not in CRITERIA:
        raise UserError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    ranks = load_ranks(rank_path, model_def, num_classes, architecture)
    return normalised_scores(ranks, criterion, normalisation)
