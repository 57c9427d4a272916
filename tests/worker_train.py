"""One worker process of tests/test_replicas.py's two-worker run: trains
with the TF_CONFIG of its environment and prints its losses as JSON."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.runtime import graph_mode  # noqa: E402


def main(config_path, *overrides):
    # As the suite's own process (tests/conftest.py): Grappler off.
    graph_mode()
    import tensorflow as tf
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    from netcompress.settings.config import load_config
    from netcompress.jobs.train import train

    config = load_config(config_path, "train", overrides)
    result = train(config, log=lambda _: None, progress=False, seed=7, dropout=False)
    print(json.dumps(result["losses"]))


if __name__ == "__main__":
    main(*sys.argv[1:])
