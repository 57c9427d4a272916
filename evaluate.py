"""Evaluate mean IoU: python evaluate.py -c config/test.config [--KEY VALUE ...]"""

import sys

from netcompress.cli import parse_script_args, run_main
from netcompress.config import apply_gpu_id, load_config
from netcompress.runtime import graph_mode


def main(argv=None):
    config_path, overrides, _ = parse_script_args(
        argv, "Evaluate a checkpoint's mean IoU; --KEY VALUE or --set KEY=VALUE "
        "overrides any config key.", "evaluate")
    config = load_config(config_path, "evaluate", overrides)
    apply_gpu_id(config["gpu_id"])
    graph_mode()
    from netcompress.evaluation import evaluate

    evaluate(config)


if __name__ == "__main__":
    sys.exit(run_main(main))
