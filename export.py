"""Deployable files: python export.py -c config/test.config --output DIR [--int8] [--onnx]"""

import sys

from netcompress.cli import parse_script_args, run_main
from netcompress.config import apply_gpu_id, load_config
from netcompress.runtime import graph_mode


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
    config_path, overrides, args = parse_script_args(
        argv, "Export a checkpoint (any model_def + mask) as a SavedModel and a TFLite "
        "file, checked against the session graph; --KEY VALUE or --set KEY=VALUE "
        "overrides any config key.", "evaluate", add_arguments)
    config = load_config(config_path, "evaluate", overrides)
    if args.check_images < 1:
        from common.errors import UserError
        raise UserError(f"--check_images must be at least 1, got {args.check_images}")
    apply_gpu_id(config["gpu_id"])
    graph_mode()
    from netcompress.export import export

    export(config, args.output, int8=args.int8, onnx=args.onnx,
           check_images=args.check_images)


if __name__ == "__main__":
    sys.exit(run_main(main))
