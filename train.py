"""Train AdapNet++: python train.py -c config/train.config [--KEY VALUE ...]"""

import sys

from netcompress.settings.cli import run_main, run_script

DESCRIPTION = ("Train AdapNet++ from a config; --KEY VALUE or --set KEY=VALUE overrides "
               "any config key.")


def main(argv=None):
    return run_script(argv, "train", DESCRIPTION, _train)


def _train(config, args, _):
    from netcompress.jobs.train import train

    train(config)


if __name__ == "__main__":
    sys.exit(run_main(main))
