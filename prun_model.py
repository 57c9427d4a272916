"""Prune AdapNet++ filters from Taylor-oracle ranks: python prun_model.py

Edit the constants below and run the script, as with the original; or keep
them and replace any of them on the command line with --NAME VALUE (read like
a config value: true/false, numbers, None = no value), or from a `key: value`
file with -c FILE, e.g.

    python prun_model.py --phase block1 --all_convs true --threshold 0.3 \
        --try_zeros false

Each setting is explained by `python prun_model.py --help` and in README.md
("Pruning"); both come from one declaration (netcompress/settings/config.py,
PRUNE_SETTINGS). The original's names Num_classes and save_nvidia_name are
kept here and on the command line; the library calls them num_classes and
rank_file.
"""

import sys

from netcompress.settings.cli import run_main, run_script
from netcompress.settings.config import accepted_keys

DESCRIPTION = ("Prune AdapNet++ filters. Every setting below can replace the header "
               "constant of prun_model.py with --NAME VALUE (YAML scalars: true, 0.3, None).")

decide_threshold = False
phase = 'all'
all_convs = True
streams = False
conv_name = None
save_nvidia_name = 'runs/demo/rank.npz'
threshold = 0.2
checkpoint_name = 'runs/demo/train'
gpu_id = ''
try_zeros = False
new_checkpoint_save = 'runs/demo/pruned/model.ckpt'
mask_load = None
mask_save = 'runs/demo/pruned/mask.npy'
Num_classes = 6
height = 64
width = 128
model_def = 'models/small.json'
new_model_def = 'runs/demo/pruned/model_def.json'
criterion = 'taylor_out'
normalisation = 'max'
min_channels = 1
round_to = 1
histogram_save = 'runs/demo/threshold_histogram.png'
classes = None


def main(argv=None):
    # The header constants: every module-level name that is a setting.
    header = {name: value for name, value in globals().items()
              if name in accepted_keys("prune")}
    return run_script(argv, "prune", DESCRIPTION, _prune,
                      defaults=(header, "prun_model.py header"), check=_prepare)


def _prepare(config, args):
    from netcompress.jobs.prune import PruneSettings, prepare

    return prepare(PruneSettings(**config))  # every check that needs no session, first


def _prune(config, args, job):
    from netcompress.jobs.prune import execute

    execute(job)


if __name__ == "__main__":
    sys.exit(run_main(main))
