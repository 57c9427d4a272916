"""Deployable files: python export.py -c config/test.config --output DIR [--int8] [--onnx]"""

import sys

from common.errors import UserError
from netcompress.settings.cli import run_main, run_script

DESCRIPTION = ("Export a checkpoint (any model_def + mask) as a SavedModel and a TFLite "
               "file, checked against the session graph; --KEY VALUE or --set KEY=VALUE "
               "overrides any config key.")


def add_arguments(parser):
    group = parser.add_argument_group("export")
    group.add_argument("--output", required=True, metavar="DIR",
                       help="a new or empty directory for saved_model/, model.tflite, ... "
                            "(it appears only once everything is written and checked)")
    group.add_argument("--int8", action="store_true",
                       help="also model_int8.tflite (dynamic-range int8 weights) and its "
                            "mIoU change on test_data")
    group.add_argument("--onnx", action="store_true",
                       help="also model.onnx (tf2onnx), checked with ONNX Runtime")
    group.add_argument("--check_images", type=int, default=8, metavar="N",
                       help="images of test_data each file is checked on (default 8)")


def main(argv=None):
    return run_script(argv, "export", DESCRIPTION, _export, add_arguments=add_arguments,
                      check=_check)


def _check(config, args):
    if args.check_images < 1:
        raise UserError(f"--check_images must be at least 1, got {args.check_images}")


def _export(config, args, _):
    from netcompress.jobs.export import export

    export(config, args.output, int8=args.int8, onnx=args.onnx,
           check_images=args.check_images)


if __name__ == "__main__":
    sys.exit(run_main(main))
