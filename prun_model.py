"""Prune AdapNet++ filters from Taylor-oracle ranks: python prun_model.py

Edit the constants below and run the script, as with the original; or keep
them and replace any of them on the command line with --NAME VALUE, the value
read like a config value (true/false, numbers, None = no value), e.g.

    python prun_model.py --phase block1 --all_convs true --threshold 0.3 \
        --try_zeros false

decide_threshold     true: no pruning; print how many channels of the selection
                     score below 0.1, 0.2, ... and write a histogram PNG of the
                     normalised scores to histogram_save.
phase                what to prune: conv1, block1 .. block4, a unit such as
                     block3/unit_4, easpp, upsample1 (conv41), upsample2
                     (conv16), decoder_conv1 (conv89, conv96), decoder_conv2
                     (conv88, conv95), or all.
all_convs            true: every prunable layer of the phase. Pruning one layer
                     at a time and retraining between gives better results.
conv_name            the layer within the phase when all_convs is false:
                     in a block or unit conv1, conv2, conv3, or one half of a
                     split conv2, conv2/A (regular) / conv2/B (atrous); conv2
                     means both halves. A block name prunes that conv in every
                     unit of the block.
                     easpp: conv256 (1x1); conv70 (1x1), conv7 / conv247 (3x3
                     atrous), conv71 (1x1) of the rate-3 branch; conv80, conv8,
                     conv248, conv81 (rate 6); conv90, conv9, conv249, conv91
                     (rate 12); conv10 (final 1x1).
                     decoder_conv1/2: conv1 or conv2 (or conv89/conv96,
                     conv88/conv95). Any phase: a full layer name, e.g.
                     block2/unit_4/bottleneck_v1/conv2/A. In phase all a
                     full name means that layer only (conv1 is the stem conv)
                     and a short name of several convs (conv2, conv3) is
                     refused. The selected layers are printed first.
save_nvidia_name     the rank file written by get_oracle_rank.py (rank_save).
threshold            channels whose normalised score is below it are removed;
                     a layer always keeps at least one channel. A finite
                     number >= 0; above 1 (normalised scores are at most 1)
                     every layer keeps only min_channels, with a warning.
checkpoint_name      the checkpoint to prune (a prefix, or a directory: its
                     newest checkpoint). Never modified.
gpu_id               GPU to use ('' = all / CPU only).
try_zeros            true: instead of removing channels, write a checkpoint of
                     the same shapes in which they no longer influence anything
                     (exactly what removal gives); evaluate it with the current
                     model_def and mask to try a threshold.
new_checkpoint_save  where the new checkpoint goes (a prefix, in another
                     directory than checkpoint_name). No output may replace
                     an input or another output (docs/outputs.md); the
                     checkpoint, model_def and mask are moved into place
                     together, once all are written.
mask_load            the current mask file (None if the model has none).
mask_save            where the new mask file goes (written when the pruned model
                     has residual masks; it carries every loaded mask forward).
Num_classes          number of classes, void (label 0) included.
height, width        input size, for the FLOPs report and the graph checks.
model_def            the current model definition.
new_model_def        where the pruned model definition goes.
criterion            taylor (Molchanov et al.'s mean |z dC/dz|) or reference
                     (the original code's clamped signed sums).
normalisation        max (divide each layer's scores by its maximum, as the
                     original) or l2 (by the layer's l2 norm, as Molchanov).
min_channels         a layer keeps at least this many channels.
round_to             round each pruned layer's kept count up to a multiple of
                     this (e.g. 8, for fast kernels); 1 = no rounding.
histogram_save       the decide_threshold histogram PNG (None = none).
"""

import sys

from netcompress.cli import run_main
from netcompress.config import apply_gpu_id
from netcompress.runtime import graph_mode

decide_threshold = False
phase = 'all'
all_convs = True
conv_name = None
save_nvidia_name = 'runs/demo/rank.npz'
threshold = 0.2
checkpoint_name = 'runs/demo/train'
gpu_id = ''
try_zeros = False
new_checkpoint_save = 'runs/demo/pruned/model.ckpt'
mask_load = None
mask_save = 'runs/demo/pruned/mask.npy'
Num_classes = 6
height = 64
width = 128
model_def = 'models/small.json'
new_model_def = 'runs/demo/pruned/model_def.json'
criterion = 'taylor'
normalisation = 'max'
min_channels = 1
round_to = 1
histogram_save = 'runs/demo/threshold_histogram.png'

HEADER = dict(
    decide_threshold=decide_threshold, phase=phase, all_convs=all_convs,
    conv_name=conv_name, save_nvidia_name=save_nvidia_name, threshold=threshold,
    checkpoint_name=checkpoint_name, gpu_id=gpu_id, try_zeros=try_zeros,
    new_checkpoint_save=new_checkpoint_save, mask_load=mask_load, mask_save=mask_save,
    Num_classes=Num_classes, height=height, width=width, model_def=model_def,
    new_model_def=new_model_def, criterion=criterion, normalisation=normalisation,
    min_channels=min_channels, round_to=round_to, histogram_save=histogram_save)


def main(argv=None):
    graph_mode()  # imports TensorFlow quietly; devices are chosen later, at first use
    from netcompress.pruning import execute, prepare, settings_from_header

    settings = settings_from_header(HEADER, sys.argv[1:] if argv is None else argv)
    job = prepare(settings)  # every check that needs no session, first
    apply_gpu_id(settings.gpu_id)
    execute(job)


if __name__ == "__main__":
    sys.exit(run_main(main))
