"""AdapNet++ graph: names, shapes, parameter count, masks, checkpoints."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import (FLOAT32_PASS_TOLERANCE, default_model_def, randomise_variables,
                     scaled_model_def)
from models import atrous
from models.AdapNet_pp import AdapNet_pp
from models.architecture import Pooling, adapnet_pp
from models.model_def import (check_masks, load_masks, save_masks,
                              validate_model_def)
from netcompress.formats import checkpoints
from netcompress.pruning_math.costs import total_parameters
from common.errors import UserError

tf1 = tf.compat.v1
P = "resnet_v2_50/"


def build_variables(model_def, num_classes, masks=None, aux=True, training=True,
                    height=64, width=64):
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, height, width, 3])
        outputs = AdapNet_pp(model_def, num_classes, masks).build(images, training, aux)
    shapes = {v.name[:-2]: v.shape.as_list() for v in checkpoints.model_variables(graph)}
    return graph, outputs, shapes


@pytest.fixture(scope="module")
def default_graph():
    return build_variables(default_model_def(), 12)


def test_default_graph_variable_names_and_shapes(default_graph):
    _, _, shapes = default_graph
    expected = {
        "conv0/BatchNorm/gamma": [3],
        "conv0/BatchNorm/moving_variance": [3],
        "conv1/weights": [7, 7, 3, 64],
        "conv1/BatchNorm/beta": [64],
        # block1/unit_1: the shortcut reads this unit's conv1 output (64 ch).
        "block1/unit_1/bottleneck_v1/conv1/weights": [1, 1, 64, 64],
        "block1/unit_1/bottleneck_v1/shortcut/weights": [1, 1, 64, 256],
        "block1/unit_1/bottleneck_v1/conv3/weights": [1, 1, 64, 256],
        # The BN in a conv3 scope is the next unit's pre-activation.
        "block1/unit_1/bottleneck_v1/conv3/BatchNorm/gamma": [256],
        "block1/unit_3/bottleneck_v1/conv3/BatchNorm/moving_mean": [256],
        "block2/unit_1/bottleneck_v1/conv1/weights": [1, 1, 256, 128],
        "block2/unit_1/bottleneck_v1/conv2/weights": [3, 3, 128, 128],
        "block2/unit_1/bottleneck_v1/shortcut/weights": [1, 1, 256, 512],
        "block2/unit_4/bottleneck_v1/conv2/weights": [3, 3, 128, 128],
        "block2/unit_4/bottleneck_v1/conv2/BatchNorm/gamma": [128],
        "block3/unit_1/bottleneck_v1/shortcut/weights": [1, 1, 512, 1024],
        "block3/unit_6/bottleneck_v1/conv2/weights": [3, 3, 256, 256],
        "block3/unit_6/bottleneck_v1/conv3/BatchNorm/beta": [1024],
        "block4/unit_1/bottleneck_v1/conv1/weights": [1, 1, 1024, 512],
        "block4/unit_1/bottleneck_v1/shortcut/weights": [1, 1, 1024, 2048],
        "block4/unit_3/bottleneck_v1/conv3/weights": [1, 1, 512, 2048],
        "block4/unit_3/bottleneck_v1/conv3/BatchNorm/gamma": [2048],
        "conv32/weights": [1, 1, 256, 24],
        "conv174/weights": [1, 1, 512, 24],
        "conv256/weights": [1, 1, 2048, 256],
        "conv70/weights": [1, 1, 2048, 64],
        "conv7/weights": [3, 3, 64, 64],
        "conv249/weights": [3, 3, 64, 64],
        "conv91/weights": [1, 1, 64, 256],
        "conv57/weights": [1, 1, 2048, 256],
        "conv10/weights": [1, 1, 5 * 256, 256],
        "conv10/BatchNorm/gamma": [256],
        "conv41/weights": [4, 4, 256, 256],
        "conv89/weights": [3, 3, 256 + 24, 256],
        "conv16/weights": [4, 4, 256, 256],
        "conv88/weights": [3, 3, 256 + 24, 256],
        "conv78/weights": [1, 1, 256, 12],
        "conv5/weights": [8, 8, 12, 12],
        "conv5/BatchNorm/moving_mean": [12],
        "conv911/weights": [1, 1, 256, 12],
        "conv912/BatchNorm/gamma": [12],
    }
    for name, shape in expected.items():
        assert shapes.get(P + name) == shape, name
    assert len(shapes) == 388
    assert not [n for n in shapes if "bias" in n]
    # Residual conv3 has no batch norm of its own beyond the pre-activation one.
    assert P + "block1/unit_1/bottleneck_v1/shortcut/BatchNorm/gamma" not in shapes


def test_parameter_count_is_30_20_million(default_graph):
    _, _, shapes = default_graph
    count = sum(int(np.prod(s)) for s in shapes.values())
    assert round(count / 1e6, 2) == 30.20
    assert total_parameters(default_model_def(), 12) == count


def test_output_shapes_and_aux_heads(default_graph):
    _, outputs, _ = default_graph
    assert outputs.logits.shape.as_list() == [None, 64, 64, 12]
    assert sorted(outputs.aux_logits) == ["conv911", "conv912"]
    for logits in outputs.aux_logits.values():
        assert logits.shape.as_list() == [None, 64, 64, 12]
    _, outputs, shapes = build_variables(default_model_def(), 12, aux=False, training=False)
    assert outputs.aux_logits == {}
    assert not [n for n in shapes if "conv911" in n or "conv912" in n]


def conv_rates(graph):
    """Conv scope -> the rate of each Conv2D in it: its dilation, or the
    block size of the SpaceToBatchND feeding it."""
    from tensorflow.python.framework import tensor_util
    rates = {}
    for op in graph.get_operations():
        if op.type != "Conv2D":
            continue
        source = op.inputs[0].op
        if source.type == "SpaceToBatchND":
            block = tensor_util.MakeNdarray(source.inputs[1].op.get_attr("value"))
            assert op.get_attr("dilations") == [1, 1, 1, 1] and block[0] == block[1]
            rate = int(block[0])
        else:
            rate = op.get_attr("dilations")[1]
        rates.setdefault(op.name.split("/SpaceToBatchND")[0].rsplit("/", 1)[0], []).append(rate)
    return {scope: sorted(values) for scope, values in rates.items()}


@pytest.mark.parametrize("path", atrous.PATHS)
def test_atrous_rates_in_graph(path):
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, 64, 64, 3])
        AdapNet_pp(default_model_def(), 12, atrous_path=path).build(images, False, True)
    rates = conv_rates(graph)
    assert rates[P + "block2/unit_4/bottleneck_v1/conv2"] == [1, 2]
    assert rates[P + "block3/unit_3/bottleneck_v1/conv2"] == [1, 2]
    # Both halves atrous at rate 2: one conv for the whole kernel.
    assert rates[P + "block4/unit_1/bottleneck_v1/conv2"] == [2]
    assert rates[P + "conv7"] == [3] and rates[P + "conv248"] == [6]
    assert rates[P + "conv249"] == [12] and rates[P + "conv256"] == [1]
    space_to_batch = [op for op in graph.get_operations() if op.type == "SpaceToBatchND"]
    # 8 split convs with an atrous half + 6 eASPP atrous convs.
    assert len(space_to_batch) == (14 if path == atrous.SPACE_TO_BATCH else 0)


def test_declared_facts_agree_with_the_built_graph():
    """The declaration's variable names, kernel axes, batch norms and output
    stride are those of a built graph: every conv's kernel has its inputs'
    width on its input axis and its outputs' on its output axis, its batch
    norm (if declared) the outputs' width; the norms outside convs have their
    group's width; the graph holds nothing else. The smallest map any conv
    writes is the input divided by the output stride."""
    from models.architecture import resolve_widths
    from dataset.synthetic import NETWORK_SIZE_MULTIPLE
    from netcompress.settings.config import INPUT_SIZE_MULTIPLE

    arch = adapnet_pp()
    model_def, num_classes, height, width = scaled_model_def(16), 3, 32, 64
    _, outputs, shapes = build_variables(model_def, num_classes, training=False,
                                         height=height, width=width)
    widths = resolve_widths(model_def, num_classes, arch)
    declared = set()
    for conv in arch.convs:
        in_channels = sum(widths[name] for name in conv.inputs)
        out_channels = sum(widths[name] for name in conv.outputs)
        kernel = shapes[conv.kernel_variable]
        input_axis, output_axis = conv.kernel_axes
        assert (kernel[input_axis], kernel[output_axis]) == (in_channels, out_channels), \
            conv.scope
        assert kernel == conv.kernel_shape(in_channels, out_channels)
        assert [shapes[name] for name in conv.norm_variables] == \
            [[out_channels]] * (4 if conv.norm else 0), conv.scope
        declared.update((conv.kernel_variable,) + conv.norm_variables)
    assert [conv.kernel_axes for conv in arch.convs if conv.transposed] == [(3, 2)] * 3
    for norm in arch.norms:
        assert [shapes[name] for name in norm.variables] == [[widths[norm.group]]] * 4
        declared.update(norm.variables)
    assert declared == set(shapes)
    assert arch.input_norm().scope == "conv0"
    assert [arch.pre_activation(unit).scope for unit in arch.units] == \
        [f"{unit.scope}/conv3" for unit in arch.units]
    assert arch.output_stride == INPUT_SIZE_MULTIPLE == NETWORK_SIZE_MULTIPLE == 16
    sizes = [tensor.shape.as_list()[1:3] for scope, tensor in outputs.read.items()
             if arch.conv(scope).pooling is not Pooling.GLOBAL_INPUT]
    assert min(sizes) == [height // arch.output_stride, width // arch.output_stride]


def test_architecture_declaration_consumers():
    architecture = adapnet_pp()
    assert len(architecture.prunable_groups()) == 77
    consumers = {c.scope: position for c, position in architecture.consumers_of("conv41")}
    assert consumers == {"conv89": 0, "conv912": 0}
    consumers = {c.scope for c, _ in
                 architecture.consumers_of("block1/unit_1/bottleneck_v1/conv1")}
    assert consumers == {"block1/unit_1/bottleneck_v1/conv2",
                         "block1/unit_1/bottleneck_v1/shortcut"}
    conv10 = architecture.conv("conv10")
    assert conv10.inputs == ("conv256", "conv71", "conv81", "conv91", "conv57")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["params"].pop("17"), "missing key(s) 17"),
    (lambda d: d["split"].__setitem__("8", [60, 60]), "sums to 120"),
    (lambda d: d["params"].__setitem__("5", [128, 128, 512]), "needs 4 entries"),
    (lambda d: d["params"].__setitem__("18", 0), "params[\"18\"]"),
])
def test_model_def_errors_name_the_problem(edit, message):
    model_def = default_model_def()
    edit(model_def)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        validate_model_def(model_def)


def test_input_size_must_be_multiple_of_16():
    with tf.Graph().as_default():
        images = tf1.placeholder(tf.float32, [1, 40, 64, 3])
        with pytest.raises(ValueError, match="multiples of 16.*40x64"):
            AdapNet_pp(scaled_model_def(16), 3).build(images)


def test_narrow_conv3_without_mask_is_rejected():
    model_def = scaled_model_def(16)
    model_def["params"]["3"][2] -= 3
    with pytest.raises(UserError, match="block1/unit_2.*no mask"):
        check_masks(model_def, {})


def test_mask_file_round_trip_and_checks(tmp_path):
    path = str(tmp_path / "mask.npy")
    masks = {"block1/unit_2": (np.array([0, 3, 7]), 16), "block3/unit_1": (np.arange(5), 64)}
    save_masks(masks, path)
    loaded = load_masks(path)
    assert np.load(path, allow_pickle=False).dtype.names == ("unit", "width", "keep")
    assert sorted(loaded) == sorted(masks)
    np.testing.assert_array_equal(loaded["block1/unit_2"][0], [0, 3, 7])
    assert loaded["block3/unit_1"][1] == 64
    model_def = scaled_model_def(16)  # residual widths 16, 32, 64, 128
    model_def["params"]["3"][2] = 3
    model_def["params"]["9"][2] = 5
    kept = check_masks(model_def, loaded)
    np.testing.assert_array_equal(kept["block3/unit_1"], np.arange(5))
    model_def["params"]["9"][2] = 6
    with pytest.raises(UserError, match="keeps 5 channels but model_def conv3 has 6"):
        check_masks(model_def, loaded)


def test_masked_network_equals_full_network_with_zero_columns():
    """A masked conv3 scatters its channels back: the network equals the
    full-width one whose conv3 kernel is zero outside the kept channels."""
    full = scaled_model_def(16)
    kept = {"block1/unit_2": np.array([1, 4, 5, 9, 15]),  # identity unit, width 16
            "block2/unit_1": np.array([0, 2, 3, 30])}     # shortcut unit, width 32
    narrow = scaled_model_def(16)
    narrow["params"]["3"][2] = 5
    narrow["params"]["5"][2] = 4
    masks = {"block1/unit_2": (kept["block1/unit_2"], 16),
             "block2/unit_1": (kept["block2/unit_1"], 32)}
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 64, 3)).astype(np.float32)

    def run(model_def, masks, values=None):
        graph = tf.Graph()
        with graph.as_default():
            x = tf1.placeholder(tf.float32, [None, 32, 64, 3])
            outputs = AdapNet_pp(model_def, 3, masks).build(x, training=False, aux=True)
            with tf1.Session() as session:
                variables = checkpoints.model_variables()
                if values is None:
                    values = randomise_variables(session, variables)
                else:
                    checkpoints.assign_values(session, {v: values[v.name[:-2]]
                                                        for v in variables})
                result = session.run([outputs.probabilities, outputs.aux_logits], {x: images})
        return result, values

    _, values = run(full, None)
    zeroed, narrowed = dict(values), dict(values)
    for unit, indices in kept.items():
        name = f"resnet_v2_50/{unit}/bottleneck_v1/conv3/weights"
        removed = np.setdiff1d(np.arange(values[name].shape[3]), indices)
        zeroed[name] = values[name].copy()
        zeroed[name][..., removed] = 0.0
        narrowed[name] = values[name][..., indices]
    (want, want_aux), _ = run(full, None, zeroed)
    (got, got_aux), _ = run(narrow, masks, narrowed)
    # The same sums in another float32 order (helpers.FLOAT32_PASS_TOLERANCE):
    # probabilities are in [0, 1], logits compared relative to their scale.
    np.testing.assert_allclose(got, want, atol=FLOAT32_PASS_TOLERANCE)
    for head in want_aux:
        scale = max(1.0, np.abs(want_aux[head]).max())
        np.testing.assert_allclose(got_aux[head], want_aux[head],
                                   atol=FLOAT32_PASS_TOLERANCE * scale)
    assert np.abs(want - run(full, None, values)[0][0]).max() > 1e-3  # the zeros matter


def test_checkpoint_with_colon_zero_keys_restores_by_name(tmp_path):
    model_def = scaled_model_def(16)
    graph, _, shapes = build_variables(model_def, 3, height=32)
    rng = np.random.default_rng(0)
    stored = {name + ":0": rng.normal(size=shape).astype(np.float32)
              for name, shape in shapes.items() if "block1" in name}
    stored["resnet_v2_50/conv1/weights:0"] = np.zeros([3, 3, 3, 3], np.float32)  # wrong
    path = checkpoints.write_checkpoint(stored, str(tmp_path / "init.ckpt"))
    with graph.as_default(), tf1.Session() as session:
        session.run(tf1.global_variables_initializer())
        variables = checkpoints.model_variables()
        restored, missing = checkpoints.restore_matching(session, path, variables)
        values = session.run({v.name[:-2]: v for v in variables})
    assert len(restored) == len(stored) - 1
    assert any(m.startswith("resnet_v2_50/conv1/weights (shape [3, 3, 3, 3]") for m in missing)
    for key, value in stored.items():
        if "block1" in key:
            np.testing.assert_array_equal(values[key[:-2]], value)


def test_strict_restore_names_first_mismatch(tmp_path):
    model_def = scaled_model_def(16)
    graph, _, shapes = build_variables(model_def, 3, height=32)
    stored = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    stored[P + "conv7/weights"] = np.zeros([3, 3, 4, 5], np.float32)
    path = checkpoints.write_checkpoint(stored, str(tmp_path / "m.ckpt"))
    with graph.as_default():
        with pytest.raises(UserError, match=r"conv7/weights is \[3, 3, 4, 5\] in the "
                                            r"checkpoint but \[3, 3, 4, 4\] in the model"):
            checkpoints.check_matches(path, checkpoints.model_variables())


# ---- the declaration's fields and queries ----------------------------------

def test_declaration_queries():
    from models.architecture import ClassesWidth, FixedWidth, ParamWidth, Pooling, \
        Shortcut, SplitWidth
    arch = adapnet_pp()
    assert [(c.scope, c.loss_weight) for c in arch.aux_heads()] == \
        [("conv911", 0.6), ("conv912", 0.5)]
    assert arch.aux_scopes() == ["conv911", "conv912"]
    assert arch.logits == "conv5" and not arch.conv("conv5").aux
    assert arch.sections() == ("conv1", "block1", "block2", "block3", "block4", "easpp",
                               "upsample1", "decoder_conv1", "upsample2", "decoder_conv2")
    assert arch.unit_ranges() == ("block1/unit_1 .. block1/unit_3, block2/unit_1 .. "
                                  "block2/unit_4, block3/unit_1 .. block3/unit_6, "
                                  "block4/unit_1 .. block4/unit_3")
    assert arch.param_keys() == tuple(str(k) for k in range(1, 38))
    assert {c.scope: c.pooling for c in arch.convs if c.pooling is not Pooling.NONE} == \
        {"conv1": Pooling.MAX_AFTER, "conv57": Pooling.GLOBAL_INPUT}
    assert [u.name for u in arch.units if u.shortcut is Shortcut.CONV1] == ["block1/unit_1"]
    assert [u.name for u in arch.units if u.shortcut is Shortcut.INPUT] == \
        ["block2/unit_1", "block3/unit_1", "block4/unit_1"]
    assert arch.first_unit("block3").name == "block3/unit_1"
    unit = arch.unit("block1/unit_1")
    assert sorted(arch.unit_convs(unit)) == ["conv1", "conv2", "conv3", "shortcut"]
    assert arch.unit_convs(unit)["shortcut"].inputs == (
        "block1/unit_1/bottleneck_v1/conv1",)  # the quirk: it reads conv1
    conv3 = arch.group("block2/unit_2/bottleneck_v1/conv3")
    assert (conv3.unit, conv3.short_name, conv3.through_mask) == \
        ("block2/unit_2", "conv3", True)
    assert arch.group("conv96").short_name == "conv2"
    model_def = default_model_def()
    assert arch.residual_width(model_def, arch.unit("block3/unit_4")) == \
        model_def["params"]["9"][3]
    # Width references read and write a model_def; fixed widths refuse.
    split = arch.group("block4/unit_1/bottleneck_v1/conv2/B").width
    assert split == SplitWidth("15", 1)
    split.assign(model_def, 100)
    assert model_def["params"]["15"][1] == model_def["split"]["15"][0] + 100
    ParamWidth("18").assign(model_def, 7)
    assert ParamWidth("18").resolve(model_def, 12) == 7
    assert ClassesWidth().resolve(model_def, 12) == 12
    with pytest.raises(ValueError, match="not prunable"):
        FixedWidth(24).assign(model_def, 3)
