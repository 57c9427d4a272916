import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.runtime import import_tensorflow_quietly  # noqa: E402

# Grappler rewrites every graph before its first run: on these tiny graphs
# that costs about 6x the run itself, for results equal within float32
# rounding. The tests turn it off (sessions made without a config take this,
# netcompress's own configs copy it); the script tests, which start
# subprocesses, run with it on as users do.
import_tensorflow_quietly().config.optimizer.set_experimental_options(
    {"disable_meta_optimizer": True})


# make test's worker processes take whole modules (--dist loadfile), in this
# order, then one at a time as they finish: the longest modules first, each
# on its own worker, so that none starts last.
LONGEST_FIRST = ("test_replicas", "test_training", "test_criteria", "test_workers",
                 "test_compress", "test_scripts", "test_pipeline", "test_faults")


def pytest_collection_modifyitems(items):
    order = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.module.__name__, len(order)))
