"""Parameters and multiply-adds per conv, read from the architecture
declaration: the one place where either is counted.

A conv's cost depends on the spatial size it runs at. That size follows from
the strides along the declaration (conv1 stride 2 and the max-pool after it,
stride-2 units in blocks 2 and 3, transposed convs going back up) and from
each conv's ``pooling`` (a max-pool after it halves what its consumers read;
image pooling runs on a 1x1 globally averaged map).

MACs count one multiply-add per kernel tap and output channel at every output
pixel (dilation does not change it); a transposed conv does k*k*in*out per
*input* pixel. Batch norm, ReLU and resizes are not counted. A masked
residual conv3 runs with its kernel widened to the residual width (see
models.layers.scatter_output_channels), so its MACs count that width while
its parameters count the kept channels.
"""

from dataclasses import dataclass
from math import ceil

from models.architecture import BATCH_NORM_VARIABLES, IMAGE, Pooling, adapnet_pp, \
    resolve_widths

BATCH_NORM_PARAMETERS = len(BATCH_NORM_VARIABLES)  # per channel


@dataclass(frozen=True)
class ConvCost:
    params: int  # kernel + batch norm if the conv has one
    macs: int


def spatial_sizes(height, width, architecture=None):
    """Conv scope -> (input height, input width, output height, output width)."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    size_of_group = {IMAGE: (height, width)}
    sizes = {}
    for conv in architecture.convs:
        in_h, in_w = size_of_group[conv.inputs[0]]
        if conv.pooling is Pooling.GLOBAL_INPUT:
            in_h, in_w = 1, 1
        if conv.transposed:
            out_h, out_w = in_h * conv.stride, in_w * conv.stride
        else:
            out_h, out_w = ceil(in_h / conv.stride), ceil(in_w / conv.stride)
        sizes[conv.scope] = (in_h, in_w, out_h, out_w)
        read_size = (out_h, out_w)
        if conv.pooling is Pooling.MAX_AFTER:
            read_size = (ceil(out_h / 2), ceil(out_w / 2))
        if conv.pooling is Pooling.GLOBAL_INPUT:
            read_size = size_of_group[conv.inputs[0]]  # resized back
        for group in conv.outputs:
            size_of_group[group] = read_size
    return sizes


def conv_costs(model_def, num_classes, height=1, width=1, masks=None, architecture=None):
    """Conv scope -> ConvCost at input size height x width (parameters do not
    depend on it); ``masks``: the residual units with a mask ({unit name:
    ...}, as load_masks gives)."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    widths = resolve_widths(model_def, num_classes, architecture)
    sizes = spatial_sizes(height, width, architecture)
    run_width = {f"{u.scope}/conv3": architecture.residual_width(model_def, u)
                 for u in architecture.units if u.name in (masks or {})}
    costs = {}
    for conv in architecture.convs:
        c_in = sum(widths[g] for g in conv.inputs)
        c_out = sum(widths[g] for g in conv.outputs)
        kernel = conv.kernel * conv.kernel * c_in * c_out
        run_kernel = conv.kernel * conv.kernel * c_in * run_width.get(conv.scope, c_out)
        in_h, in_w, out_h, out_w = sizes[conv.scope]
        pixels = in_h * in_w if conv.transposed else out_h * out_w
        params = kernel + (BATCH_NORM_PARAMETERS * c_out if conv.norm else 0)
        costs[conv.scope] = ConvCost(params, run_kernel * pixels)
    return costs


def inference_macs(model_def, num_classes, height, width, masks=None, architecture=None):
    """Multiply-adds of one inference (auxiliary heads are not built for it)."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    costs = conv_costs(model_def, num_classes, height, width, masks, architecture)
    return sum(costs[c.scope].macs for c in architecture.convs if not c.aux)


def total_parameters(model_def, num_classes, architecture=None):
    """Every model variable, aux heads included (what a checkpoint holds):
    the convs and the declared batch norms outside them (the image's, and
    each unit's pre-activation over the residual width)."""
    # None: AdapNet++'s, for tests and bench/ scripts, which build no model.
    architecture = architecture or adapnet_pp()
    widths = resolve_widths(model_def, num_classes, architecture)
    convs = sum(cost.params for cost in conv_costs(model_def, num_classes,
                                                  architecture=architecture).values())
    norms = sum(BATCH_NORM_PARAMETERS * widths[norm.group] for norm in architecture.norms)
    return convs + norms
