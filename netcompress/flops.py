"""Parameters and multiply-adds per conv, read from the architecture declaration.

A conv's cost depends on the spatial size it runs at. That size follows from
the strides along the declaration (conv1 stride 2 and the max-pool after it,
stride-2 units in blocks 2 and 3, transposed convs going back up), with two
places the declaration cannot express and this module knows about:

- the 3x3/2 max-pool after ``conv1``: ``conv1`` itself runs at 1/2, its
  consumers read it at 1/4;
- the image-pooling conv ``conv57`` runs on a 1x1 globally pooled map.

MACs count one multiply-add per kernel tap and output channel at every output
pixel (dilation does not change it); a transposed conv does k*k*in*out per
*input* pixel. Batch norm, ReLU and resizes are not counted. A masked
residual conv3 runs with its kernel widened to the residual width (see
models.layers.scatter_output_channels), so its MACs count that width while
its parameters count the kept channels.
"""

from dataclasses import dataclass
from math import ceil

from models.architecture import IMAGE, UNITS, adapnet_pp, resolve_widths
from models.model_def import parameter_count, residual_width

MAX_POOL_AFTER = "conv1"
GLOBALLY_POOLED = "conv57"


@dataclass(frozen=True)
class ConvCost:
    params: int  # kernel + batch norm (4 per channel) if the conv has one
    macs: int


def spatial_sizes(height, width, architecture=None):
    """Conv scope -> (input height, input width, output height, output width)."""
    architecture = architecture or adapnet_pp()
    size_of_group = {IMAGE: (height, width)}
    sizes = {}
    for conv in architecture.convs:
        in_h, in_w = size_of_group[conv.inputs[0]]
        if conv.scope == GLOBALLY_POOLED:
            in_h, in_w = 1, 1
        if conv.transposed:
            out_h, out_w = in_h * conv.stride, in_w * conv.stride
        else:
            out_h, out_w = ceil(in_h / conv.stride), ceil(in_w / conv.stride)
        sizes[conv.scope] = (in_h, in_w, out_h, out_w)
        read_size = (out_h, out_w)
        if conv.scope == MAX_POOL_AFTER:
            read_size = (ceil(out_h / 2), ceil(out_w / 2))
        if conv.scope == GLOBALLY_POOLED:
            read_size = size_of_group[conv.inputs[0]]  # resized back
        for group in conv.outputs:
            size_of_group[group] = read_size
    return sizes


def conv_costs(model_def, num_classes, height, width, masks=None, architecture=None):
    """Conv scope -> ConvCost at input size height x width; ``masks``: the
    residual units with a mask ({unit name: ...}, as load_masks gives)."""
    architecture = architecture or adapnet_pp()
    widths = resolve_widths(model_def, num_classes, architecture)
    sizes = spatial_sizes(height, width, architecture)
    run_width = {f"{u.scope}/conv3": residual_width(model_def, u)
                 for u in UNITS if u.name in (masks or {})}
    costs = {}
    for conv in architecture.convs:
        c_in = sum(widths[g] for g in conv.inputs)
        c_out = sum(widths[g] for g in conv.outputs)
        kernel = conv.kernel * conv.kernel * c_in * c_out
        run_kernel = conv.kernel * conv.kernel * c_in * run_width.get(conv.scope, c_out)
        in_h, in_w, out_h, out_w = sizes[conv.scope]
        pixels = in_h * in_w if conv.transposed else out_h * out_w
        params = kernel + (4 * c_out if conv.norm else 0)
        costs[conv.scope] = ConvCost(params, run_kernel * pixels)
    return costs


def inference_macs(model_def, num_classes, height, width, masks=None, architecture=None):
    """Multiply-adds of one inference (auxiliary heads are not built for it)."""
    architecture = architecture or adapnet_pp()
    costs = conv_costs(model_def, num_classes, height, width, masks, architecture)
    return sum(costs[c.scope].macs for c in architecture.convs if not c.aux)


def total_parameters(model_def, num_classes):
    """Every model variable, aux heads included (what a checkpoint holds)."""
    return parameter_count(model_def, num_classes)
