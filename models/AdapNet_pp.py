"""AdapNet++ graph builder (docs/design.md), driven by ``models.architecture``.

Configs name it ``model: AdapNet_pp`` (module and class of the same name).
"""

from collections import namedtuple

import tensorflow as tf

from models import atrous, layers
from models.architecture import IMAGE, OUTER_SCOPE, Pooling, Shortcut, adapnet_pp, \
    resolve_widths
from models.model_def import check_masks, validate_model_def

tf1 = tf.compat.v1

WEIGHT_DECAY = 5e-4

Outputs = namedtuple("Outputs",
                     "logits probabilities aux_logits pre_norm pre_norm_kept read stream_reads")
Outputs.__doc__ = """logits/probabilities at input resolution; aux_logits: head
scope -> logits resized to the input (empty without aux); pre_norm: conv
scope -> the conv's output before batch norm (what the taylor criterion
differentiates); read: conv scope -> the output its consumers read, after
batch norm, ReLU and pooling, before any gate (what removing a channel
deletes: taylor_out); pre_norm_kept: for a masked conv3, whose outputs are
scattered to the residual width, scope -> the positions of its own channels;
stream_reads: residual stream -> every tensor its readers read (each unit's
pre-activation output and the block output), before any gate."""


class AdapNet_pp:
    # On the class: pruning, ranking and costs read the declaration of the
    # model a config names without building it (netcompress/graphs/models.py).
    architecture = adapnet_pp()

    def __init__(self, model_def, num_classes, masks=None, atrous_path=atrous.AUTO,
                 fold_masks=False):
        """``masks``: {unit name: (kept indices, residual width)} as from
        ``load_masks``, or None. ``atrous_path``: how dilated convs are
        computed (``models.atrous``; same variables and outputs either way).
        ``fold_masks`` (inference only): a masked conv3's kernel variable has
        the residual width and is restored widened once (``folded_kernels``),
        instead of the narrow variable widened on every run (docs/deploy.md)."""
        validate_model_def(model_def)
        self.atrous_path = atrous_path
        self.fold_masks = fold_masks
        self.model_def = model_def
        self.num_classes = num_classes
        self.masks = dict(masks or {})
        self.widths = resolve_widths(model_def, num_classes, self.architecture)
        self.kept_channels = check_masks(model_def, masks or {})
        # Tests switch dropout off to compare replica counts step for step.
        self.dropout = True

    def folded_kernels(self):
        """{kernel variable name: (kept, residual width)} of the masked conv3s
        whose kernel is built at the residual width (``fold_masks``); the
        checkpoint holds them narrow (checkpoints.restore_model widens them)."""
        if not self.fold_masks:
            return {}
        return {self.architecture.unit_convs(unit)["conv3"].kernel_variable:
                (self.kept_channels[unit.name],
                 self.architecture.residual_width(self.model_def, unit))
                for unit in self.architecture.units if unit.name in self.kept_channels}

    # ---- graph -------------------------------------------------------------
    def build(self, images, training=False, aux=False, gates=None):
        """Build under scope resnet_v2_50 on float BGR ``images`` [N,H,W,3].
        ``gates``: {prunable group name: float tensor [channels]} multiplied
        into what the group's consumers read; a gate of 0 computes exactly
        what removing the channel does (docs/ranking.md, "Comparing criteria")."""
        height, width = images.shape[1], images.shape[2]
        stride = self.architecture.output_stride
        if height is None or width is None or height % stride or width % stride:
            raise ValueError(f"input height and width must be known multiples of {stride}, "
                             f"got {height}x{width}")
        if training and self.fold_masks and self.kept_channels:
            # Training updates the narrow kernel; a wide one would fill its zeros.
            raise ValueError("fold_masks builds inference graphs only, not training=True")
        self._path = atrous.resolve_path(self.atrous_path)
        self._gates = dict(gates or {})
        unknown = sorted(set(self._gates) - {
            g.name for g in self.architecture.prunable_groups(streams=True)})
        if unknown:
            raise ValueError(f"gates for groups that are not prunable: {unknown}")
        tensors, pre_norm, self._read, self._stream_reads = {}, {}, {}, {}
        with tf1.variable_scope(OUTER_SCOPE):
            with tf1.variable_scope(self.architecture.input_norm().scope):
                tensors[IMAGE] = layers.batch_norm(images, training)
            units_built = False
            for conv in self.architecture.convs:
                if conv.aux and not aux:
                    continue
                if conv.unit:  # the residual units are built together, in order
                    if not units_built:
                        self._residual_units(tensors, pre_norm, training)
                        units_built = True
                elif conv.pooling is Pooling.GLOBAL_INPUT:
                    self._image_pooling(conv, tensors, pre_norm, training)
                else:
                    self._apply(conv, tensors, pre_norm, training)
        size = [height, width]
        aux_logits = {conv.scope: layers.resize_bilinear(tensors[conv.scope], size)
                      for conv in self.architecture.aux_heads() if aux}
        logits = tensors[self.architecture.logits]
        pre_norm_kept = {f"{unit.scope}/conv3": self.kept_channels[unit.name]
                         for unit in self.architecture.units
                         if unit.name in self.kept_channels}
        return Outputs(logits, tf.nn.softmax(logits), aux_logits, pre_norm, pre_norm_kept,
                       self._read, self._stream_reads)

    def _residual_units(self, tensors, pre_norm, training):
        architecture = self.architecture
        residual_sum, previous = None, None
        for unit in architecture.units:
            convs = architecture.unit_convs(unit)
            unit_input = convs["conv1"].inputs[0]
            if previous is not None:
                tensors[unit_input] = self._stream_read(
                    previous, self._pre_activation(residual_sum, previous, training))
            self._apply(convs["conv1"], tensors, pre_norm, training)
            self._apply(convs["conv2"], tensors, pre_norm, training)
            scatter = None
            if unit.name in self.kept_channels:
                scatter = (self.kept_channels[unit.name],
                           architecture.residual_width(self.model_def, unit))
            branch = self._apply(convs["conv3"], tensors, pre_norm, training, scatter=scatter)
            if training and self.dropout and unit.dropout_keep < 1.0:
                branch = tf1.nn.dropout(branch, rate=1.0 - unit.dropout_keep)
            if unit.shortcut is Shortcut.NONE:
                residual_sum = branch + residual_sum
            else:
                residual_sum = branch + self._apply(convs["shortcut"], tensors, pre_norm,
                                                    training, store=False)
            previous = unit
        tensors[previous.residual_group] = self._stream_read(
            previous, self._pre_activation(residual_sum, previous, training))

    def _stream_read(self, unit, y):
        """A pre-activation output as its readers see it: times the stream's
        gate, if any (a gate on every read of a stream is its removal)."""
        group = unit.residual_group
        self._stream_reads.setdefault(group, []).append(y)
        return y * self._gates[group] if group in self._gates else y

    def _pre_activation(self, residual_sum, unit, training):
        # The next unit's (or the block's) BN + ReLU lives in this unit's conv3 scope.
        with tf1.variable_scope(self.architecture.pre_activation(unit).scope):
            return tf.nn.relu(layers.batch_norm(residual_sum, training))

    def _image_pooling(self, conv, tensors, pre_norm, training):
        features = tensors[conv.inputs[0]]
        pooled = {conv.inputs[0]: tf.reduce_mean(features, axis=[1, 2], keepdims=True)}
        y = self._apply(conv, pooled, pre_norm, training, store=False)
        tensors[conv.scope] = layers.resize_bilinear(y, tf.shape(features)[1:3])

    def _inputs(self, conv, tensors):
        if len(conv.inputs) > 1 and tuple(conv.inputs) in tensors:
            return tensors[tuple(conv.inputs)]  # the whole output of a split conv
        parts = [tensors[name] for name in conv.inputs]
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=3)

    def _apply(self, conv, tensors, pre_norm, training, store=True, scatter=None):
        """``scatter``: (kept, width) for a masked residual conv3, whose output
        goes to positions ``kept`` of ``width`` channels (zeros elsewhere)."""
        x = self._inputs(conv, tensors)
        widths = [self.widths[name] for name in conv.outputs]
        in_channels = sum(self.widths[name] for name in conv.inputs)
        out_channels = sum(widths)
        with tf1.variable_scope(conv.scope):
            if conv.transposed:
                kernel = layers.weight_variable(conv.kernel_shape(in_channels, out_channels))
                z = layers.conv2d_transpose(x, kernel, conv.stride)
            else:
                if scatter is not None and self.fold_masks:  # restored widened
                    kernel = layers.weight_variable(conv.kernel_shape(in_channels, scatter[1]))
                else:
                    kernel = layers.weight_variable(conv.kernel_shape(in_channels, out_channels))
                    if scatter is not None:
                        kernel = layers.scatter_output_channels(kernel, *scatter)
                if len(set(conv.rates)) == 1:  # a split conv of one rate is one conv
                    z = atrous.conv2d(x, kernel, conv.stride, conv.rates[0], self._path)
                else:  # split conv: one variable, parts with their own rates
                    z = tf.concat([atrous.conv2d(x, part, conv.stride, rate, self._path)
                                   for part, rate in zip(tf.split(kernel, widths,
                                                                  axis=conv.kernel_axes[1]),
                                                         conv.rates)], axis=3)
            pre_norm[conv.scope] = z
            y = layers.batch_norm(z, training) if conv.norm else z
            if conv.relu:
                y = tf.nn.relu(y)
        if conv.pooling is Pooling.MAX_AFTER:
            y = tf.nn.max_pool2d(y, 3, 2, "SAME")
        self._read[conv.scope] = y
        if not self.architecture.group(conv.outputs[0]).stream:  # gated where it is read
            y = self._gated(conv, y, scatter)
        if store:
            if len(conv.outputs) == 1:
                tensors[conv.outputs[0]] = y
            else:
                tensors[tuple(conv.outputs)] = y
        return y

    def _gated(self, conv, y, scatter):
        """``y`` times the gates of ``conv``'s output groups (ones where a
        group has none); a masked conv3's gate goes to its kept positions."""
        if not any(name in self._gates for name in conv.outputs):
            return y
        parts = [self._gates[name] if name in self._gates
                 else tf.ones([self.widths[name]]) for name in conv.outputs]
        gate = parts[0] if len(parts) == 1 else tf.concat(parts, 0)
        if scatter is not None:
            kept, width = scatter
            gate = tf.scatter_nd(tf.constant(kept, tf.int64)[:, None], gate, [width])
        return y * gate

    # ---- loss --------------------------------------------------------------
    def per_example_loss(self, outputs, labels):
        """Weighted pixel-wise cross-entropy (void weight 0), averaged over each
        image's pixels; main + each auxiliary head's loss_weight times its
        own (0.6 conv911, 0.5 conv912) when the aux heads were built. Shape [N]."""
        not_void = 1.0 - labels[..., 0]

        def cross_entropy(logits):
            per_pixel = -tf.reduce_sum(labels * tf.nn.log_softmax(logits), axis=-1)
            return tf.reduce_mean(per_pixel * not_void, axis=[1, 2])

        loss = cross_entropy(outputs.logits)
        for head in self.architecture.aux_heads():
            if head.scope in outputs.aux_logits:
                loss += head.loss_weight * cross_entropy(outputs.aux_logits[head.scope])
        return loss

    @staticmethod
    def weight_decay():
        """L2 decay on every trainable variable (weights, gammas, betas)."""
        variables = tf1.trainable_variables(OUTER_SCOPE)
        return WEIGHT_DECAY * tf.add_n([tf.nn.l2_loss(v) for v in variables])
