"""Evaluate mean IoU: python evaluate.py -c config/test.config [--KEY VALUE ...]"""

import sys

from netcompress.settings.cli import run_main, run_script

DESCRIPTION = ("Evaluate a checkpoint's mean IoU; --KEY VALUE or --set KEY=VALUE "
               "overrides any config key.")


def main(argv=None):
    return run_script(argv, "evaluate", DESCRIPTION, _evaluate)


def _evaluate(config, args, _):
    from netcompress.jobs.evaluate import evaluate

    evaluate(config)


if __name__ == "__main__":
    sys.exit(run_main(main))
