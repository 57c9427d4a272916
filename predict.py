"""Colour-coded predictions: python predict.py -c config/test.config --input DIR_OR_TFRECORD --output DIR"""

import sys

from common.errors import UserError
from netcompress.settings.cli import run_main, run_script

DESCRIPTION = ("Predict label maps of images with a checkpoint (any model_def + mask); "
               "--KEY VALUE or --set KEY=VALUE overrides any config key.")


def add_arguments(parser):
    group = parser.add_argument_group("predict")
    group.add_argument("--input", required=True, metavar="PATH",
                       help="a directory of PNG/JPEG images, one image, or a .tfrecords file")
    group.add_argument("--output", required=True, metavar="DIR",
                       help="where NAME_label.png, NAME_overlay.png and legend.png go "
                            "(created if needed; files of those names are replaced)")
    group.add_argument("--palette", default="auto", metavar="SPEC",
                       help="auto (Cityscapes colours for 12/19/20 classes, else distinct), "
                            "cityscapes, distinct, or a file of `R G B [name]` lines")
    group.add_argument("--cityscapes_ids", action="store_true",
                       help="write only CITY_SEQ_FRAME_labelIds.png in Cityscapes label ids "
                            "(num_classes 20 or 12), for its official evaluation; --input "
                            "is searched recursively for *_leftImg8bit.png")
    group.add_argument("--overlays", default=None, metavar="DIR",
                       help="with --cityscapes_ids: where the colour labels, overlays and "
                            "legend go (outside --output); none without it")
    # Class names for the legend: the config key `classes` (also --classes FILE).


def main(argv=None):
    return run_script(argv, "predict", DESCRIPTION, _predict, add_arguments=add_arguments)


def _predict(config, args, _):
    from netcompress.jobs.predict import predict

    if args.overlays is not None and not args.cityscapes_ids:
        raise UserError("--overlays goes with --cityscapes_ids (otherwise the colour files "
                        "go to --output)")
    predict(config, args.input, args.output, palette=args.palette,
            cityscapes_ids=args.cityscapes_ids, overlays=args.overlays)


if __name__ == "__main__":
    sys.exit(run_main(main))
