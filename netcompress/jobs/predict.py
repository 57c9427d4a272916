"""predict.py: colour-coded label maps and overlays of images (docs/deploy.md).

Inputs: a directory of PNG/JPEG files (not searched recursively), one
image file, or a .tfrecords file of the project's format. Each image is
resized (bilinear) to the network's height x width, run through the
serving graph (netcompress/graphs/serving.py), and its class map resized back to
the image's own size (nearest neighbour). For each image NAME:

  NAME_label.png    a palette PNG: pixel values are class ids, shown in
                    the class colours (reads back with Pillow as ids)
  NAME_overlay.png  the image with the class colours blended in (void
                    pixels left as they are)

and once, legend.png (colour, id and name of every class). Files are
written atomically; files of the same names in the output directory are
replaced, nothing else there is touched.

With ``cityscapes_ids`` (README "Cityscapes") the input is searched
recursively for *_leftImg8bit.png and the output holds only
CITY_SEQ_FRAME_labelIds.png per image, in Cityscapes label ids, which is
what its official evaluation reads; the colour label, overlay and legend go
to another directory, if one is given.
"""

import os
import sys

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from tqdm import tqdm

from common.digests import checkpoint_line, records_line
from common.errors import UserError, one_line
from common.files import make_directory, replace_atomically
from common.outputs import check_outputs
from dataset.records import count_records, read_examples
from netcompress.graphs import serving
from netcompress.formats.checkpoint_paths import input_checkpoint_files
from netcompress.graphs.models import with_checkpoint_model
from netcompress.formats.palette import config_class_names, make_palette

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_PREDICTION_SUFFIX = "_labelIds.png"
RECORD_EXTENSIONS = (".tfrecords", ".tfrecord")
LABEL_SUFFIX = "_label.png"
OVERLAY_SUFFIX = "_overlay.png"
LEGEND = "legend.png"
OVERLAY_ALPHA = 0.5


# ---- inputs ----------------------------------------------------------------

class Source:
    """The images to predict: ``names`` (output stems, known up front) and
    ``items()`` yielding (name, RGB uint8 array or None, reason if None)."""

    def __init__(self, path, cityscapes=False):
        self.path = path
        if not os.path.exists(path):
            raise UserError(f"--input {path!r} does not exist")
        self.records = os.path.isfile(path) and path.lower().endswith(RECORD_EXTENSIONS)
        if cityscapes:
            self._cityscapes_files(path)
        elif self.records:
            count = count_records(path)
            stem = _stem(path)
            self.names = [f"{stem}_{index:05d}" for index in range(count)]
            self.files = [path]
        elif os.path.isdir(path):
            self.files = sorted(os.path.join(path, name) for name in os.listdir(path)
                                if name.lower().endswith(IMAGE_EXTENSIONS)
                                and os.path.isfile(os.path.join(path, name)))
            if not self.files:
                raise UserError(f"--input {path!r} holds no .png, .jpg or .jpeg file")
            self.names = [_stem(file) for file in self.files]
        elif path.lower().endswith(IMAGE_EXTENSIONS):
            self.files = [path]
            self.names = [_stem(path)]
        else:
            raise UserError(f"--input {path!r} is neither a directory, a PNG/JPEG file nor a "
                            f".tfrecords file")
        seen = {}
        for file, name in zip(self.files if not self.records else self.names, self.names):
            if name in seen:
                raise UserError(f"{seen[name]} and {file} would both be written as {name}: "
                                f"rename one")
            seen[name] = file

    def _cityscapes_files(self, path):
        """Cityscapes' images under path (recursively), named by their frame."""
        if self.records:
            raise UserError(f"--cityscapes_ids needs Cityscapes' images (their names say "
                            f"which frame they are); {path!r} is a record file")
        if os.path.isdir(path):
            self.files = sorted(os.path.join(folder, name)
                                for folder, _, names in os.walk(path) for name in names
                                if name.endswith(CITYSCAPES_IMAGE_SUFFIX))
            if not self.files:
                raise UserError(f"--input {path!r} holds no *{CITYSCAPES_IMAGE_SUFFIX} "
                                f"(searched recursively)")
        elif path.endswith(CITYSCAPES_IMAGE_SUFFIX):
            self.files = [path]
        else:
            raise UserError(f"--cityscapes_ids: {path!r} is not a directory nor a Cityscapes "
                            f"image (CITY_SEQ_FRAME{CITYSCAPES_IMAGE_SUFFIX})")
        self.names = [os.path.basename(file)[:-len(CITYSCAPES_IMAGE_SUFFIX)]
                      for file in self.files]

    def items(self):
        if self.records:
            yield from self._records()
            return
        for file, name in zip(self.files, self.names):
            try:
                with Image.open(file) as image:
                    if image.mode.startswith("I") or image.mode == "F":
                        # convert("RGB") would clip 16-bit values to white; the
                        # converter refuses these images too (docs/deploy.md).
                        yield name, None, (f"{file}: unsupported mode {image.mode} (expected "
                                           f"8-bit grayscale or colour, as for training)")
                        continue
                    yield name, np.asarray(image.convert("RGB")), None
            except (OSError, UnidentifiedImageError, ValueError,
                    Image.DecompressionBombError) as exc:
                yield name, None, f"{file}: {one_line(exc)}"

    def _records(self):
        names = iter(self.names)
        try:
            for image_bgr, _ in read_examples(self.path):
                yield next(names), np.ascontiguousarray(image_bgr[..., ::-1]), None
        except UserError as exc:  # a damaged record ends the file, not the run
            yield next(names, "?"), None, f"stopped reading: {exc}"


def _stem(path):
    base = os.path.basename(path.rstrip(os.sep))
    return os.path.splitext(base)[0]


# ---- images ----------------------------------------------------------------

def network_input(image_rgb, height, width):
    """uint8 BGR [height, width, 3] as the network takes it (OpenCV order,
    like the records); bilinear resize only when the size differs."""
    if image_rgb.shape[:2] != (height, width):
        image_rgb = np.asarray(Image.fromarray(image_rgb).resize((width, height),
                                                                 Image.BILINEAR))
    return np.ascontiguousarray(image_rgb[..., ::-1])


def to_original_size(class_map, height, width):
    """A class map resized to height x width by nearest neighbour (ids stay ids)."""
    if class_map.shape == (height, width):
        return class_map.astype(np.uint8)
    resized = Image.fromarray(class_map.astype(np.uint8)).resize((width, height),
                                                                 Image.NEAREST)
    return np.asarray(resized)


def label_image(class_map, palette):
    height, width = class_map.shape
    image = Image.frombytes("P", (width, height), class_map.astype(np.uint8).tobytes())
    image.putpalette(palette.flat())
    return image


def overlay_image(image_rgb, class_map, palette, alpha=OVERLAY_ALPHA):
    colours = np.asarray(palette.colours, dtype=np.float32)[class_map]
    blended = (1.0 - alpha) * image_rgb.astype(np.float32) + alpha * colours
    blended[class_map == 0] = image_rgb[class_map == 0]  # void: the image itself
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def legend_image(palette, row=22):
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    labels = [f"{i:>3}  {name}" for i, name in enumerate(palette.names)]
    width = 16 + row + 8 + max(int(font.getlength(text)) for text in labels) + 16
    image = Image.new("RGB", (width, 8 + row * len(labels) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for index, (colour, text) in enumerate(zip(palette.colours, labels)):
        top = 8 + index * row
        draw.rectangle([16, top, 16 + row - 4, top + row - 4], fill=colour,
                       outline=(0, 0, 0))
        draw.text((16 + row + 8, top + 2), text, fill=(0, 0, 0), font=font)
    return image


def save_png(image, path):
    replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


# ---- the run ---------------------------------------------------------------

def output_paths(output, name):
    return (os.path.join(output, name + LABEL_SUFFIX),
            os.path.join(output, name + OVERLAY_SUFFIX))


def cityscapes_path(output, name):
    """The prediction file of frame ``name`` (CITY_SEQ_FRAME): the official
    evaluation takes the one PNG whose name starts with the frame."""
    return os.path.join(output, name + CITYSCAPES_PREDICTION_SUFFIX)


def _check_directory(key, directory, source):
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise UserError(f"{key} {directory!r} exists and is not a directory")
    if os.path.isdir(source.path) and os.path.realpath(source.path) == \
            os.path.realpath(directory):
        raise UserError(f"{key} {directory!r} is the input directory: its label and overlay "
                        f"PNGs would be read as inputs next time; choose another directory")


def _inside(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _check_output(source, config, output, cityscapes_ids=False, overlays=None):
    """``output``: the colour files' directory, or with ``cityscapes_ids`` the
    label-id PNGs' (the colour files then go to ``overlays``, if given)."""
    _check_directory("--output", output, source)
    written = {}
    colour_key, colour_dir = "--output", output
    if cityscapes_ids:
        written["--output"] = [cityscapes_path(output, name) for name in source.names]
        colour_key, colour_dir = "--overlays", overlays
        if overlays is not None:
            _check_directory("--overlays", overlays, source)
            if _inside(overlays, output):
                # The evaluation walks --output recursively: any other PNG of
                # a frame there would count as a second prediction.
                raise UserError(f"--overlays {overlays!r} is inside --output {output!r}, "
                                f"where Cityscapes' evaluation would take its PNGs for "
                                f"predictions: choose a directory outside it")
    if colour_dir is not None:
        written.setdefault(colour_key, []).extend(
            [path for name in source.names for path in output_paths(colour_dir, name)]
            + [os.path.join(colour_dir, LEGEND)])
    inputs = {"--input": source.files,
              "checkpoint": input_checkpoint_files(config["checkpoint"]),
              "model_def": [config["model_def"]] if config.get("model_def") else [],
              "mask": [config["mask"]] if config.get("mask") else [],
              "classes": [config["classes"]] if config.get("classes") else []}
    check_outputs(written, inputs)
    return colour_dir


def predict(config, input_path, output, palette="auto", log=print, progress=True,
            cityscapes_ids=False, overlays=None):
    """Write label and overlay PNGs of every image of ``input_path`` into
    ``output`` and the legend; returns {'written': [names], 'skipped':
    [reasons]}. Unreadable images are skipped with a one-line warning.
    ``cityscapes_ids``: only CITY_SEQ_FRAME_labelIds.png into ``output``
    (Cityscapes label ids); the colour files go to ``overlays`` if given.
    Class names come from the config's optional `classes` file."""
    class_set = None
    if cityscapes_ids and config.get("num_classes") is not None:
        from dataset.cityscapes import class_set_for
        class_set_for(config["num_classes"])  # the config's mistake before the checkpoint's
    source = Source(input_path, cityscapes=cityscapes_ids)
    colour_dir = _check_output(source, config, output, cityscapes_ids, overlays)
    config = with_checkpoint_model(config)  # num_classes, model: the checkpoint's
    if cityscapes_ids:
        from dataset.cityscapes import class_set_for
        class_set = class_set_for(config["num_classes"])
    colours = make_palette(config["num_classes"], palette, config_class_names(config))
    graph = serving.ServingGraph(config)
    height, width = graph.height, graph.width
    for directory in {output, colour_dir} - {None}:
        make_directory(directory)
    written, skipped = [], []
    with tf.compat.v1.Session(graph=graph.graph) as session:
        prefix = graph.restore(session)
        bar = tqdm(total=len(source.names), desc="predict", unit="img",
                   disable=not progress, dynamic_ncols=True)

        def run(batch):
            maps = session.run(graph.class_map, {graph.images: np.stack(
                [network_input(image, height, width) for _, image in batch])})
            for (name, image), class_map in zip(batch, maps):
                class_map = to_original_size(class_map, *image.shape[:2])
                if class_set is not None:
                    save_png(Image.fromarray(class_set.label_ids_of(class_map)),
                             cityscapes_path(output, name))
                if colour_dir is not None:
                    label_path, overlay_path = output_paths(colour_dir, name)
                    save_png(label_image(class_map, colours), label_path)
                    save_png(overlay_image(image, class_map, colours), overlay_path)
                written.append(name)
            bar.update(len(batch))

        with bar:
            batch = []
            for name, image, problem in source.items():
                if image is None:
                    skipped.append(problem)
                    bar.write(f"warning: skipped {problem}", file=sys.stderr)
                    bar.update(1)
                    continue
                batch.append((name, image))
                if len(batch) == config["batch_size"]:
                    run(batch)
                    batch = []
            if batch:
                run(batch)
    if not written:
        raise UserError(f"no image of {input_path} could be read ({len(skipped)} skipped)")
    log(checkpoint_line(prefix))
    if source.records:
        log(records_line("--input", input_path, len(written)))
    skipped_note = f"; skipped {len(skipped)} unreadable image(s)" if skipped else ""
    if class_set is not None:
        log(f"wrote {len(written)} prediction(s) in Cityscapes label ids "
            f"(CITY_SEQ_FRAME{CITYSCAPES_PREDICTION_SUFFIX}) to {output}" + skipped_note)
    if colour_dir is not None:
        save_png(legend_image(colours), os.path.join(colour_dir, LEGEND))
        log(f"palette: {colours.source}")
        log(f"wrote {len(written)} {'colour label(s)' if class_set else 'prediction(s)'} "
            f"and {LEGEND} to {colour_dir}" + (skipped_note if class_set is None else ""))
    return {"written": written, "skipped": skipped}
