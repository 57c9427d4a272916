"""prun_model.py's job on files (README.md, "Pruning"): check the outputs,
read the model and rank file, select layers (netcompress/pruning_math/selection.py), score
them (scores.py), plan (plan.py), then print the summary (reports.py) or
write the zeroed or pruned checkpoint, model_def and masks together.
"""

import dataclasses
import os
from dataclasses import dataclass, field, make_dataclass

from common.digests import checkpoint_digest, checkpoint_line
from common.errors import UserError
from common.files import staged
from models.model_def import check_masks, save_masks, save_model_def
from common import outputs
from netcompress.formats.checkpoint_paths import checkpoint_directory, checkpoint_files, \
    input_checkpoint_files, record_in_state_file, resolve_checkpoint
from netcompress.settings.config import PRUNE_SETTINGS, REQUIRED
from netcompress.formats.description import DEFAULT_MODEL, checkpoint_model, describe
from netcompress.formats.palette import read_class_names
from netcompress.graphs.models import model_architecture
from netcompress.pruning_math.plan import model_values, plan_pruning, remove_channels, \
    zero_channels
from netcompress.jobs.prune_report import cost_report, threshold_summary
from netcompress.pruning_math.criteria import CRITERIA
from netcompress.formats.rankfile import load_ranks
from netcompress.pruning_math.scores import normalised_scores
from netcompress.pruning_math.selection import ALL_PHASE, select_layers


# prun_model.py's settings, one field per declared setting (netcompress/settings/config.py).
PruneSettings = make_dataclass(
    "PruneSettings", [(s.name, object) if s.default is REQUIRED else (s.name, object, s.default)
                      for s in PRUNE_SETTINGS], kw_only=True)


@dataclass
class PruneResult:
    plan: object = None
    report: str = ""
    written: list = field(default_factory=list)


def _check_new_checkpoint_directory(new_prefix, source):
    """``source``: the checkpoint prefix or directory the run reads."""
    if os.path.dirname(os.path.realpath(new_prefix)) == checkpoint_directory(source):
        # Training would resume from, and a directory evaluation load, the
        # pruned checkpoint there.
        raise UserError(f"new_checkpoint_save {new_prefix!r} is in the source checkpoint's "
                        f"directory {checkpoint_directory(source)}: write it to another "
                        f"directory")


def planned_files(settings, with_mask=True):
    """(outputs, inputs) of a run, as {setting name: [files]}."""
    inputs = {"rank_file": [settings.rank_file],
              "checkpoint_name": input_checkpoint_files(settings.checkpoint_name)}
    if settings.model_def is not None:
        inputs["model_def"] = [settings.model_def]
    if settings.mask_load is not None:
        inputs["mask_load"] = [settings.mask_load]
    if settings.decide_threshold:
        written = {"histogram_save": [settings.histogram_save]} \
            if settings.histogram_save else {}
        return written, inputs
    # The set's manifest goes with its checkpoint (docs/outputs.md).
    written = {"new_checkpoint_save": checkpoint_files(settings.new_checkpoint_save)
               + [outputs.set_manifest(settings.new_checkpoint_save)]}
    if not settings.try_zeros:
        written["new_model_def"] = [settings.new_model_def]
        if with_mask and settings.mask_save is not None:
            written["mask_save"] = [settings.mask_save]
    return written, inputs


def _check_outputs(settings):
    """Nothing the run writes may replace one of its inputs or each other."""
    outputs.check_outputs(*planned_files(settings))
    if not settings.decide_threshold:
        outputs.check_sets(planned_files(settings)[0], [])
        _check_new_checkpoint_directory(settings.new_checkpoint_save, settings.checkpoint_name)


def verify_checkpoint(path, model_def, masks, num_classes, height, width, name,
                      model=DEFAULT_MODEL):
    """Build the graph of model_def + masks (class ``model``, a config's
    `model` name) and check that the checkpoint at ``path`` has exactly its
    variables (aux heads included)."""
    import tensorflow as tf

    from netcompress.formats.checkpoints import check_matches, model_variables
    from netcompress.graphs.models import model_class

    graph = tf.Graph()
    with graph.as_default():
        built = model_class(model)(model_def, num_classes, masks)
        images = tf.compat.v1.placeholder(tf.float32, [1, height, width, 3])
        built.build(images, training=False, aux=True)
        check_matches(path, model_variables(graph), model_name=name,
                      optional_scopes=built.architecture.aux_scopes())


@dataclass
class PruneJob:
    """Everything decided before TensorFlow is needed."""
    settings: PruneSettings
    model_def: dict
    masks: dict
    layers: list
    scores: dict = None  # normalised scores: read by decide_threshold only
    plan: object = None  # PruningPlan; None with decide_threshold
    ranks: object = None  # the RankSums read (None: compress.py's own plan)
    # The model class the graph checks build (a `model` name), and what the
    # written checkpoints' descriptions name (netcompress/formats/description.py).
    model_name: str = DEFAULT_MODEL
    class_names: dict = None
    source: str = "the model"  # the source model in messages
    # The source checkpoint was restored strictly into this model already
    # (compress.py's rank pass): execute does not build its graph to check it.
    source_verified: bool = False

    def description(self, model_def, masks):
        return describe(model_def, masks, self.settings.num_classes, self.model_name,
                        self.class_names)


def prepare(settings):
    """Check the outputs, read and check the inputs and make the plan; no
    session (so that mistakes are reported at once). The model is the one the
    checkpoint describes (settings.model_def and mask_load, when given, must
    equal it), or for an undescribed checkpoint the settings' files."""
    _check_outputs(settings)
    found = checkpoint_model(settings.checkpoint_name, settings.model_def, settings.mask_load,
                             settings.num_classes, mask_name="mask_load")
    settings = dataclasses.replace(settings, num_classes=found.num_classes)
    model_def, masks = found.model_def, found.masks
    check_masks(model_def, masks, source=settings.mask_load or "mask")
    class_names = read_class_names(settings.classes, found.num_classes) \
        if settings.classes else (found.description and found.description.class_names())
    model_name = found.model or DEFAULT_MODEL
    architecture = model_architecture(model_name)
    layers = select_layers(settings.phase, settings.conv_name, settings.all_convs,
                           architecture, streams=settings.streams)
    if settings.criterion not in CRITERIA:
        raise UserError(f"unknown criterion {settings.criterion!r}; valid: "
                        f"{', '.join(CRITERIA)}")
    ranks = load_ranks(settings.rank_file, model_def, settings.num_classes, architecture)
    if not settings.decide_threshold:  # the checkpoint's content: checked in execute
        ranks.check_masks(masks, settings.mask_load or (
            "the checkpoint's masks" if found.description else "no mask file"))
    scores = normalised_scores(ranks, settings.criterion, settings.normalisation)
    missing = [layer for layer in layers if layer not in scores]
    if missing:
        raise UserError(f"rank file {settings.rank_file} has no scores for {missing[0]} "
                        f"(written before residual streams were ranked): regenerate it "
                        f"with get_oracle_rank.py")
    job = PruneJob(settings, model_def, masks, layers, scores, ranks=ranks,
                   model_name=model_name, class_names=class_names,
                   source=found.label)
    if settings.decide_threshold:
        return job
    job.plan = plan_pruning(model_def, masks, settings.num_classes, scores, layers,
                            settings.threshold, settings.min_channels, settings.round_to,
                            architecture)
    if job.plan.masks_after and not settings.try_zeros and settings.mask_save is None:
        raise UserError("the pruned model has residual masks but mask_save is None: "
                        "give a path for the mask file")
    return job


def execute(job, log=print, verify=True):
    """decide_threshold's summary, or write the try_zeros checkpoint, or the
    pruned checkpoint, model_def and masks. ``verify``: build the graphs to
    check that the source checkpoint matches its model and the new one the
    pruned model (a few seconds each)."""
    settings, plan = job.settings, job.plan
    if settings.decide_threshold:
        report = threshold_summary(job.scores, job.layers, settings.histogram_save)
        log(report)
        return PruneResult(report=report, written=[settings.histogram_save]
                           if settings.histogram_save else [])

    from netcompress.formats.checkpoints import read_checkpoint

    if settings.phase == ALL_PHASE and settings.all_convs:
        log(f"selected all {len(job.layers)} prunable layers")
    else:
        log(f"selected {len(job.layers)} layer(s): {', '.join(job.layers)}")
    if plan.threshold is not None and plan.threshold > 1:
        log(f"warning: threshold {plan.threshold:g} > 1: normalised scores are at most "
            f"1 with max normalisation, so every selected layer keeps only its "
            f"min_channels best channels")
    source = resolve_checkpoint(settings.checkpoint_name)
    _check_new_checkpoint_directory(settings.new_checkpoint_save, source)
    log(checkpoint_line(source))
    if job.ranks is not None:
        job.ranks.check_checkpoint(source, checkpoint_digest(source), log)
    if verify and not job.source_verified:
        verify_checkpoint(source, job.model_def, job.masks, settings.num_classes,
                          settings.height, settings.width, job.source, job.model_name)
    values = model_values(read_checkpoint(source))
    new_values = zero_channels(plan, values) if settings.try_zeros \
        else remove_channels(plan, values)
    # try_zeros keeps the source's model; removal writes the pruned one.
    description = job.description(job.model_def, job.masks) if settings.try_zeros \
        else job.description(plan.model_def_after, plan.masks_after)
    written = _write_result(settings, plan, new_values, verify, description, job.model_name)
    if settings.try_zeros:
        log(f"try_zeros: wrote {settings.new_checkpoint_save} (same shapes, {job.source}); "
            f"evaluate it as it is; the costs below are those removal would give")
    else:
        mask_path = settings.mask_save if plan.masks_after else None
        log(f"wrote checkpoint {settings.new_checkpoint_save}, model_def "
            f"{settings.new_model_def}, mask {mask_path}")
    report = cost_report(plan, settings.height, settings.width)
    log(report)
    return PruneResult(plan, report, written)


def _write_result(settings, plan, new_values, verify, description, model_name):
    """Write the new checkpoint (and model_def and mask) and the set's
    manifest through staging places, moved in only when all are written and
    the new checkpoint restores into its model; the files of a replaced set
    that the new one lacks (a mask) go with the move. Returns the paths
    written."""
    from netcompress.formats.checkpoints import write_checkpoint

    files, _ = planned_files(settings, with_mask=bool(plan.masks_after))
    prefix = settings.new_checkpoint_save
    manifest = outputs.set_manifest(prefix)
    stale = outputs.check_sets(planned_files(settings)[0],
                               [path for paths in files.values() for path in paths])
    with staged() as staging:
        places = {path: staging.place(path, key=path == prefix + ".index")
                  for paths in files.values() for path in paths}
        for path in stale:
            staging.remove(path)
        staged_prefix = places[prefix + ".index"][:-len(".index")]
        write_checkpoint(new_values, staged_prefix, description)
        if not settings.try_zeros:
            if plan.masks_after:
                save_masks(plan.masks_after, places[settings.mask_save])
            save_model_def(plan.model_def_after, places[settings.new_model_def])
            if verify:
                verify_checkpoint(staged_prefix, plan.model_def_after, plan.masks_after,
                                  settings.num_classes, settings.height, settings.width,
                                  f"pruned model_def {settings.new_model_def}", model_name)
        with open(places[manifest], "w", encoding="utf-8") as f:
            f.write(outputs.manifest_text(manifest, {
                key: [path for path in paths if path != manifest]
                for key, paths in files.items()}))
    record_in_state_file(prefix)
    return [prefix] + [
        getattr(settings, key) for key in ("mask_save", "new_model_def") if key in files]


def prune(settings, log=print, verify=True):
    """decide_threshold, try_zeros or removal, per the settings."""
    return execute(prepare(settings), log, verify)
