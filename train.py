"""Train AdapNet++: python train.py -c config/train.config [--KEY VALUE ...]"""

import sys

from netcompress.cli import parse_script_args, run_main
from netcompress.config import TRAIN_OPTIONAL, apply_gpu_id, load_config
from netcompress.runtime import graph_mode


def main(argv=None):
    config_path, overrides, _ = parse_script_args(
        argv, "Train AdapNet++ from a config; --KEY VALUE or --set KEY=VALUE overrides "
        "any config key.", "train", optional=TRAIN_OPTIONAL)
    config = load_config(config_path, "train", overrides, optional=TRAIN_OPTIONAL)
    apply_gpu_id(config["gpu_id"])
    graph_mode()
    from netcompress.training import train

    train(config)


if __name__ == "__main__":
    sys.exit(run_main(main))
