"""Taylor oracle ranking (get_oracle_rank.py, docs/ranking.md).

For every prunable layer (a prunable group of ``models.architecture``: a conv's
output, or one half of a split conv) and output channel k, with z the conv's
output before batch norm:

    t_n(k) = (1/M) * sum over the M = H x W positions of z * dC/dz   (example n)

One session run per batch computes, in the graph, t for every example and
layer and reduces it over the batch to small vectors per layer: sum_n |t_n|
(the ``taylor`` criterion), sum_n t_n (``reference``, the original code's
signed sum) and sum_n |t_out_n| (``taylor_out``, below); only those are
fetched and accumulated in float64 on the host (``RankSums``).

C is the *sum* over the batch of the per-example losses (each the pixel mean
of the weighted cross-entropy, aux heads included) with batch norm in
inference mode, so examples do not interact: dC/dz restricted to example n is
that example's own gradient, and the scores do not depend on the batch size or
on how the data are split into batches or shards. (The original code
differentiated the batch-mean loss and averaged z * dC/dz over the batch too:
a batch of N added sum_n t_n / N^2, a short last batch of N' added
sum_n t_n / N'^2, so its sums are ours / N^2 only when all batches have size
N; per-layer normalisation cancels that factor, not the short batch's weight.)
"""

import json

import numpy as np
import tensorflow as tf

from dataset.records import count_records
from models.architecture import output_offset
from models.model_def import load_masks
from netcompress.formats import rankfile
from netcompress.formats.checkpoint_paths import resolve_checkpoint
from common.digests import checkpoint_digest, records_digest
from netcompress.graphs.models import with_checkpoint_model
from common.errors import UserError
from netcompress.graphs.inference import InferenceGraph
from netcompress.formats.rankfile import DIGEST_KEYS, SUMS, RankSums, masks_json
from netcompress.formats.sharding import parse_shard, records_in_shard, shard_label

tf1 = tf.compat.v1

def rank_layers(architecture):
    """Prunable layer names of ``architecture`` (the model's declaration) in
    its order, residual streams included: the rank file's keys."""
    return [group.name for group in architecture.prunable_groups(streams=True)]


def ranked_convs(architecture):
    """Convs writing at least one prunable layer other than a stream, in
    declaration order (a stream is scored from all its writers and reads)."""
    prunable = {g.name for g in architecture.prunable_groups()}
    return [conv for conv in architecture.convs if prunable.intersection(conv.outputs)]


def per_example_taylor(loss, pre_norm, convs, architecture, pre_norm_kept=None, read=None,
                       stream_reads=None):
    """{conv scope: t [N, C_out]}, the per-example spatial mean of z * dC/dz
    for every conv in ``convs`` (z: its output before batch norm), and, when
    ``read`` (the tensors consumers read) is given, {conv scope: t_out
    [N, C_out]}, the per-example spatial *sum* of a * dC/da: the derivative
    of the example's loss by a gate on the channel. One ``tf.gradients``
    call for both. ``pre_norm_kept``: scope -> the conv's own channels within
    a tensor the builder scattered to a wider (masked) width.

    ``stream_reads`` ({stream: [tensors its readers read]}, with ``read``)
    adds each residual stream, keyed by its name: t = the sum of its writers'
    t (at the stream's width; the derivative by one scale on all of them), and
    t_out = the sum over its reads (the derivative by a gate on the stream)."""
    pre_norm_kept = pre_norm_kept or {}
    streams = list(stream_reads or {})
    writers = {name: architecture.stream_writers(name) for name in streams}
    z_convs = list(convs) + [w for name in streams for w in writers[name]
                             if w not in convs]
    wanted = [(conv.scope, "t", pre_norm[conv.scope], tf.reduce_mean) for conv in z_convs]
    if read is not None:
        wanted += [(conv.scope, "t_out", read[conv.scope], tf.reduce_sum) for conv in convs]
        wanted += [(name, "t_out", tensor, tf.reduce_sum) for name in streams
                   for tensor in stream_reads[name]]
    gradients = tf.gradients(loss, [tensor for _, _, tensor, _ in wanted])
    full = {"t": {}, "t_out": {}}
    for (key, kind, tensor, reduce), gradient in zip(wanted, gradients):
        if gradient is None:
            raise ValueError(f"the loss does not depend on {key} "
                             f"(were the aux heads built?)")
        t = reduce(tensor * gradient, axis=[1, 2])
        full[kind][key] = full[kind][key] + t if key in full[kind] else t
    results = {"t": {}, "t_out": {}}
    for conv in convs:
        for kind in ("t", "t_out") if read is not None else ("t",):
            t = full[kind][conv.scope]
            if conv.scope in pre_norm_kept:
                t = tf.gather(t, pre_norm_kept[conv.scope], axis=1)
            results[kind][conv.scope] = t
    for name in streams:
        # A masked conv3's z already has the stream's width (zeros elsewhere).
        results["t"][name] = tf.add_n([full["t"][w.scope] for w in writers[name]])
        results["t_out"][name] = full["t_out"][name]
    return results["t"] if read is None else (results["t"], results["t_out"])


class BatchTaylorSums:
    """Graph tensors giving one batch's per-layer sums, packed for one fetch.

    ``fetches`` evaluates to (packed [3, total channels] float32, batch size):
    rows in rankfile.SUMS order (sum_n |t_n|, sum_n t_n, sum_n |t_out_n|),
    convs' channels concatenated, then the residual streams'; ``accumulate``
    unpacks a fetched value into RankSums.
    """

    def __init__(self, model, outputs, labels):
        architecture = model.architecture
        self.layers = rank_layers(architecture)
        self.widths = {name: model.widths[name] for name in self.layers}
        # Per-example losses summed: see the module docstring.
        loss = tf.reduce_sum(model.per_example_loss(outputs, labels))
        streams = {g.name: outputs.stream_reads[g.name] for g in architecture.stream_groups()}
        t_by_key, t_out_by_key = per_example_taylor(
            loss, outputs.pre_norm, ranked_convs(architecture), architecture,
            outputs.pre_norm_kept, outputs.read, streams)
        rows = {"taylor": [], "reference": [], "taylor_out": []}
        for key, t in t_by_key.items():
            rows["taylor"].append(tf.reduce_sum(tf.abs(t), axis=0))
            rows["reference"].append(tf.reduce_sum(t, axis=0))
            rows["taylor_out"].append(tf.reduce_sum(tf.abs(t_out_by_key[key]), axis=0))
        # Layers are sliced out of each conv's [A | B] output on the host
        # (offsets below), so a split conv is one reduction, not two.
        self._key_order = list(t_by_key)
        self._key_widths = [int(t.shape[1]) for t in t_by_key.values()]
        self.packed = tf.stack([tf.concat(rows[kind], 0) for kind in SUMS])
        # Examples counted: a padding example (all-zero labels, not even
        # void; dataset/pipeline.py) adds zero to every sum and is not one.
        self.batch_size = tf.reduce_sum(tf.cast(tf.reduce_any(labels > 0, axis=[1, 2, 3]),
                                                tf.int32))
        self._slices = self._layer_slices(architecture, model.widths)

    def _layer_slices(self, architecture, widths):
        key_start = dict(zip(self._key_order,
                             np.concatenate([[0], np.cumsum(self._key_widths)[:-1]])))
        slices = {}
        for name in self.layers:
            if architecture.group(name).stream:
                start = int(key_start[name])
            else:
                conv = architecture.producer_of(name)
                start = int(key_start[conv.scope]) + output_offset(conv, name, widths)
            slices[name] = slice(start, start + widths[name])
        return slices

    @property
    def fetches(self):
        return (self.packed, self.batch_size)

    def unpack(self, packed):
        """{sum kind: {layer: float64 [channels]}} from a fetched packed value."""
        packed = np.asarray(packed, np.float64)
        return {kind: {name: packed[row, self._slices[name]] for name in self.layers}
                for row, kind in enumerate(SUMS)}

    def accumulate(self, sums, fetched):
        packed, batch_size = fetched
        for kind, by_layer in self.unpack(packed).items():
            for name, values in by_layer.items():
                sums.add(kind, name, values)
        sums.count += int(batch_size)


def _column_l1(values, conv, widths):
    """sum of |w| of each output column of ``conv``'s kernel, float64."""
    kernel = np.abs(np.asarray(values[conv.kernel_variable], np.float64))
    output_axis = conv.kernel_axes[1]
    return kernel.sum(axis=tuple(a for a in range(4) if a != output_axis))


def filter_l1(values, architecture, widths, kept_channels=None):
    """{layer: l1 norm of each output channel's filter} from checkpoint values
    (a split half's columns; a transposed conv's output axis is 2). A
    residual stream's channel sums the columns of all its writers (a masked
    conv3's at its kept positions, ``kept_channels``: {unit: positions})."""
    kept_channels = kept_channels or {}
    norms = {}
    for group in architecture.prunable_groups(streams=True):
        if group.stream:
            total = np.zeros(widths[group.name])
            for writer in architecture.stream_writers(group.name):
                columns = _column_l1(values, writer, widths)
                positions = kept_channels.get(writer.unit) if writer.unit and \
                    writer.outputs != (group.name,) else None
                if positions is None:
                    total += columns
                else:
                    total[np.asarray(positions, np.int64)] += columns
            norms[group.name] = total
            continue
        conv = architecture.producer_of(group.name)
        start = output_offset(conv, group.name, widths)
        norms[group.name] = _column_l1(values, conv, widths)[start:start + widths[group.name]]
    return norms


# ---- the ranking pass ------------------------------------------------------------

def masks_description(mask_path, masks=None):
    """The mask file (or ``masks``, as load_masks gives) as JSON:
    {unit: {"width": w, "kept": [indices]}}."""
    return masks_json(load_masks(mask_path) if masks is None else masks)


def rank_metadata(config, shard, model_def, masks=None):
    """``config['checkpoint']``: a resolved prefix (what was restored);
    ``masks``: the ranked model's (the checkpoint's, which the config's mask
    file may leave unnamed); default: the config's mask file."""
    return {
        "model_def_json": json.dumps(model_def),
        "model_def_sha256": rankfile.model_def_digest(model_def),
        "masks_json": masks_description(config.get("mask"), masks),
        "checkpoint": config["checkpoint"],
        "data": config["test_data"],
        "shard": shard_label(shard),
        "checkpoint_sha256": checkpoint_digest(config["checkpoint"]),
        "data_sha256": records_digest(config["test_data"]),
    }


def rank(config, shard=None, progress=True):
    """One pass over ``config['test_data']`` (or one shard (index, count) of
    it) with the checkpoint restored; returns the filled RankSums."""
    # Resolved once: the pass, the filter norms and the metadata read one prefix.
    config = dict(config, checkpoint=resolve_checkpoint(config["checkpoint"]))
    config = with_checkpoint_model(config)
    data_path = config["test_data"]
    total = records_in_shard(count_records(data_path), shard)
    if total == 0:
        raise UserError(f"shard {shard_label(shard)} of {data_path} holds no examples")
    made = []  # one BatchTaylorSums per replica, all alike

    def per_replica(model, images, labels):
        made.append(BatchTaylorSums(model, model.build(images, training=False, aux=True),
                                    labels))
        return {"packed": made[-1].packed, "count": made[-1].batch_size}

    # Several replicas: each ranks its share of a batch; the sums add.
    # Masked kernels folded: the pass differentiates activations, never kernels.
    inference = InferenceGraph(config, data_path, shard=shard, per_replica=per_replica,
                               fold_masks=True)
    batch_sums = made[0]
    sums = RankSums(batch_sums.layers, batch_sums.widths)

    def handle(fetched):
        batch_sums.accumulate(sums, fetched)
        return int(fetched[1]), None

    fetches = (inference.results["packed"], inference.results["count"])
    inference.run_pass(config, fetches, handle, total, "rank", progress)
    for name in sums.layers:
        if not np.isfinite(sums.sums["taylor"][name]).all():
            raise UserError(f"the Taylor values of {name} are not finite: the loss of "
                            f"checkpoint {config['checkpoint']} on {data_path} overflows")
    sums.metadata.update(rank_metadata(config, shard, inference.model.model_def,
                                       inference.model.masks))
    model = inference.model
    # The values restored for the pass: the checkpoint is read once.
    sums.l1 = filter_l1(inference.restored_values, model.architecture, model.widths,
                        model.kept_channels)
    return sums


# ---- merging shard files -------------------------------------------------------

def merge_shards(paths, log=print):
    """Sum shard rank files of one model, checkpoint and data set.

    The same shard twice, or shards of different splits, would count examples
    twice: refused. Missing shards only warn (a partial merge is still a
    valid, smaller sample)."""
    if not paths:
        raise UserError("merging needs at least one shard rank file")
    parts = [(path, RankSums.load(path)) for path in paths]
    first_path, first = parts[0]
    for path, part in parts:
        if not all(part.metadata[key] for key in DIGEST_KEYS):
            log(f"warning: rank file {path} records no content digests (written before they "
                f"were recorded): shards are matched by checkpoint and data paths only")
    for path, part in parts[1:]:
        for key, digest_key, what in (("checkpoint", "checkpoint_sha256", "checkpoint"),
                                      ("data", "data_sha256", "record file")):
            ours, theirs = first.metadata[digest_key], part.metadata[digest_key]
            if ours and theirs:
                if ours != theirs:  # the same path may hold other content by now
                    raise UserError(f"rank files {first_path} and {path} were computed on "
                                    f"different {what} contents (sha256 {ours[:12]} and "
                                    f"{theirs[:12]}): merge only shards of one checkpoint "
                                    f"and one record file")
            elif part.metadata[key] != first.metadata[key]:
                raise UserError(f"rank file {path} was computed with {key} "
                                f"{part.metadata[key]!r}, {first_path} with "
                                f"{first.metadata[key]!r}")
    seen, split = {}, []
    for path, part in parts:
        label = part.metadata["shard"]
        if label in seen:
            raise UserError(f"rank files {seen[label]} and {path} are the same shard "
                            f"{label}: merging them would count its examples twice")
        if "/" not in label or label.startswith("merged"):
            raise UserError(f"rank file {path} is not a shard file (shard {label!r}); "
                            f"only the files of one --shard I/N split can be merged")
        seen[label] = path
        split.append(parse_shard(label))
    counts = {count for _, count in split}
    if len(counts) > 1:
        raise UserError(f"shards of different splits ({', '.join(seen)}) overlap")
    count = counts.pop()
    missing = sorted(set(range(count)) - {index for index, _ in split})
    if missing:
        log(f"warning: shard(s) {', '.join(f'{i}/{count}' for i in missing)} not given; "
            f"the merged ranks cover only part of the data")
    return rankfile.merge(parts)


# ---- report ----------------------------------------------------------------------

def summary_table(sums, criterion="taylor"):
    """Lines of a per-layer table: channels, and min / median / max of the
    score divided by the layer's maximum (what the pruner thresholds by
    default), plus the raw layer maximum to compare layers."""
    scores = sums.scores(criterion)
    name_width = max(len(name) for name in sums.layers)
    lines = [f"{'layer':<{name_width}}  channels     min  median     max  layer max "
             f"({criterion}, / layer max)"]
    for name in sums.layers:
        score = scores[name]
        top = float(score.max()) if score.size else 0.0
        if top > 0:
            normalised = score / top
            stats = (f"{normalised.min():7.4f} {np.median(normalised):7.4f} "
                     f"{normalised.max():7.4f}")
        else:
            stats = f"{'-':>7} {'-':>7} {'-':>7}"
        lines.append(f"{name:<{name_width}}  {score.size:8d} {stats}  {top:9.3e}")
    lines.append(f"{len(sums.layers)} layers, {sum(s.size for s in scores.values())} "
                 f"channels, {sums.count} examples")
    return lines
