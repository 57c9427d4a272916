"""The iterative procedure over stages: train -> rank -> prune ->
retrain (from the pruned checkpoint) -> evaluate -> rank -> prune again."""

import numpy as np
import pytest

from helpers import scaled_model_def, write_config, write_json
from dataset import synthetic
from models.architecture import UNITS
from models.model_def import load_masks, load_model_def
from netcompress.pruning_math.costs import total_parameters
from netcompress.settings.config import load_config
from netcompress.jobs.evaluate import evaluate
from netcompress.jobs.prune import PruneSettings, prune
from netcompress.jobs.rank import rank
from netcompress.jobs.train import train

HEIGHT, WIDTH = 32, 64


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    files = synthetic.generate(str(root / "data"), num_train=16, num_test=8,
                               height=HEIGHT, width=WIDTH, seed=5)
    return root, files


def stage_configs(root, files, stage, model_def, mask, initialize):
    common = dict(gpu_id="", model="AdapNet_pp", num_classes=synthetic.NUM_CLASSES,
                  batch_size=4, skip_step=5, height=HEIGHT, width=WIDTH, mask=mask,
                  model_def=model_def)
    run = root / f"stage{stage}"
    train_config = write_config(root / f"train{stage}.config", dict(
        common, intialize=initialize, checkpoint=run / "model.ckpt",
        train_data=files["train"], max_iteration=8, learning_rate=0.001, save_step=8,
        power=0.9))
    eval_values = dict(common, checkpoint=run, test_data=files["test"])
    test_config = write_config(root / f"test{stage}.config", eval_values)
    rank_config = write_config(root / f"rank{stage}.config", dict(
        eval_values, test_data=files["train"], rank_save=root / f"rank{stage}.npz"))
    return train_config, test_config, rank_config


@pytest.mark.slow
def test_two_stages_of_train_rank_prune_then_retrain(workspace):
    root, files = workspace
    model_def = write_json(root / "stage0.json", scaled_model_def(16))
    mask, initialize = None, None
    history = []
    for stage in range(2):
        train_config, test_config, rank_config = stage_configs(
            root, files, stage, model_def, mask, initialize)
        train(load_config(train_config, "train"), progress=False)
        matrix = evaluate(load_config(test_config, "evaluate"), log=lambda _: None,
                          progress=False)
        assert matrix.num_images == 8
        ranks = rank(load_config(rank_config, "oracle_rank"), progress=False)
        ranks.save(str(root / f"rank{stage}.npz"))
        assert ranks.count == 16
        out = root / f"pruned{stage}"
        result = prune(PruneSettings(
            decide_threshold=False, phase="all", all_convs=True, conv_name=None,
            rank_file=str(root / f"rank{stage}.npz"), threshold=0.2,
            checkpoint_name=str(root / f"stage{stage}"), gpu_id="", try_zeros=False,
            new_checkpoint_save=str(out / "model.ckpt"), mask_load=mask,
            mask_save=str(out / "mask.npy"), num_classes=synthetic.NUM_CLASSES,
            height=HEIGHT, width=WIDTH, model_def=model_def,
            new_model_def=str(out / "model_def.json")), log=lambda _: None)
        assert result.plan.pruned_layers
        before = total_parameters(load_model_def(model_def), synthetic.NUM_CLASSES)
        model_def, mask = str(out / "model_def.json"), str(out / "mask.npy")
        initialize = str(out / "model.ckpt")
        after = total_parameters(load_model_def(model_def), synthetic.NUM_CLASSES)
        assert after < before
        history.append((before, after, load_masks(mask)))

    # Masks always index the full residual width, and later stages only keep
    # channels that earlier stages kept.
    for (_, _, earlier), (_, _, later) in zip(history, history[1:]):
        for unit in UNITS:
            if unit.name in earlier:
                kept_before, width = earlier[unit.name]
                kept_after, width_after = later[unit.name]
                assert width_after == width
                assert set(kept_after) <= set(kept_before)
    # The last pruned model trains and evaluates too.
    train_config, test_config, _ = stage_configs(root, files, 2, model_def, mask, initialize)
    result = train(load_config(train_config, "train"), progress=False)
    assert np.isfinite(result["losses"]).all()
    evaluate(load_config(test_config, "evaluate"), log=lambda _: None, progress=False)
