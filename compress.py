"""Staged compression in one command (docs/compress.md):

    python compress.py -c config/compress.config [--KEY VALUE ...]

Each stage ranks the model (training records), searches the largest
thresholds whose gated model stays within an mIoU budget on the validation
records, prunes, retrains and evaluates on the test records; the run stops
after `stages` stages, at a target reduction, or when nothing can go within
the budget. A rerun with the same run_dir resumes after the last finished
stage. The stage table goes to run_dir/stages.csv, the plot to
run_dir/compression.png.
"""

import sys

from netcompress.settings.cli import run_main, run_script

DESCRIPTION = ("Compress a trained model in stages: rank -> threshold search on val_data "
               "within an mIoU budget -> prune -> retrain -> evaluate on test_data. "
               "--KEY VALUE or --set KEY=VALUE overrides any config key.")


def main(argv=None):
    return run_script(argv, "compress", DESCRIPTION, _run, check=_check)


def _check(config, args):
    from netcompress.jobs.compress import check

    return check(config, args)


def _run(config, args, rows):
    from netcompress.jobs.compress import run

    run(config, args, rows)


if __name__ == "__main__":
    sys.exit(run_main(main))
