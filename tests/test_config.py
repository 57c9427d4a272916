import os
import re
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO
from netcompress.settings.cli import parse_script_args
from netcompress.formats.checkpoint_paths import checkpoint_exists
from netcompress.settings.config import apply_gpu_id, load_config
from common.errors import UserError


TRAIN_TEXT = """\
gpu_id: 0
model: AdapNet_pp.AdapNet_pp
num_classes: 12
intialize: init/resnet_v2_50.ckpt
checkpoint: runs/demo/model.ckpt
train_data: data/train.tfrecords
batch_size: 8
skip_step: 10
height: 384
width: 768
max_iteration: 150000
learning_rate: 1e-4
save_step: 500
power: 1
mask: None
model_def: models/default.json
"""

EVALUATE_TEXT = """\
gpu_id: '1'
model: AdapNet_pp
num_classes: 12
checkpoint: runs/demo
test_data: data/test.tfrecords
batch_size: 1
skip_step: 20
height: 384
width: 768
mask: masks/mask.npy
model_def: models/default.json
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding every file the configs point to
    (relative paths in configs resolve against the current directory)."""
    for name in ("data/train.tfrecords", "data/test.tfrecords",
                 "models/default.json", "masks/mask.npy",
                 "init/resnet_v2_50.ckpt.index", "runs/demo/checkpoint"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(directory, text, name="test.config"):
    path = directory / name
    path.write_text(text)
    return str(path)


def train_config(workdir, replace=None, drop=(), add=""):
    lines = []
    for line in TRAIN_TEXT.splitlines():
        key = line.split(":", 1)[0]
        if key in drop:
            continue
        if replace and key in replace:
            line = "%s: %s" % (key, replace[key])
        lines.append(line)
    return write_config(workdir, "\n".join(lines) + "\n" + add)


def test_train_config_loads_with_normalised_types(workdir):
    config = load_config(train_config(workdir), "train")
    assert config == {
        "gpu_id": "0",
        "model": "AdapNet_pp.AdapNet_pp",
        "num_classes": 12,
        "initialize": "init/resnet_v2_50.ckpt",
        "checkpoint": "runs/demo/model.ckpt",  # output: need not exist
        "train_data": "data/train.tfrecords",
        "batch_size": 8,
        "skip_step": 10,
        "height": 384,
        "width": 768,
        "max_iteration": 150000,
        "learning_rate": 1e-4,  # YAML reads `1e-4` as a string
        "save_step": 500,
        "power": 1.0,
        "mask": None,
        "model_def": "models/default.json",
        "atrous_path": "auto",
        "replicas": 1,
        "classes": None,
        # left out: their declared defaults
        "flip": False,
        "end_learning_rate": 1e-4,
        "max_to_keep": 3,
        "write_graph": False,
        "worker_timeout": 600.0,
    }
    assert isinstance(config["power"], float)
    assert isinstance(config["learning_rate"], float)


def test_initialize_alias_and_empty_initialize(workdir):
    path = train_config(workdir, drop=("intialize",),
                        add="initialize: init/resnet_v2_50.ckpt\n")
    assert load_config(path, "train")["initialize"] == "init/resnet_v2_50.ckpt"
    path = train_config(workdir, replace={"intialize": "None"})
    config = load_config(path, "train")
    assert config["initialize"] is None and "intialize" not in config


def test_both_initialize_spellings_is_an_error(workdir):
    path = train_config(workdir, add="initialize: init/resnet_v2_50.ckpt\n")
    with pytest.raises(UserError, match="'intialize' and 'initialize'"):
        load_config(path, "train")


@pytest.mark.parametrize("written", ["None", "none", "null", "~", "''", ""])
def test_mask_none_spellings_mean_no_mask(workdir, written):
    path = train_config(workdir, replace={"mask": written})
    assert load_config(path, "train")["mask"] is None


def test_optional_keys_default_when_left_out(workdir):
    path = train_config(workdir, drop=("gpu_id", "mask", "intialize"))
    config = load_config(path, "train")
    assert (config["gpu_id"], config["mask"], config["initialize"]) == ("", None, None)


def test_evaluate_config_checkpoint_directory_and_mask(workdir):
    config = load_config(write_config(workdir, EVALUATE_TEXT), "evaluate")
    assert config["gpu_id"] == "1"
    assert config["checkpoint"] == "runs/demo"
    assert config["mask"] == "masks/mask.npy"
    assert set(config) == {"gpu_id", "model", "num_classes", "checkpoint",
                           "test_data", "batch_size", "skip_step", "height",
                           "width", "mask", "model_def", "atrous_path", "classes"}


def test_oracle_rank_needs_rank_save(workdir):
    path = write_config(workdir, EVALUATE_TEXT)
    with pytest.raises(UserError, match="missing required key 'rank_save'"):
        load_config(path, "oracle_rank")
    path = write_config(workdir, EVALUATE_TEXT + "rank_save: out/rank.npz\n")
    assert load_config(path, "oracle_rank")["rank_save"] == "out/rank.npz"


def test_unknown_key_names_key_value_and_suggestion(workdir):
    path = train_config(workdir, add="batchsize: 4\n")
    with pytest.raises(UserError) as info:
        load_config(path, "train")
    message = str(info.value)
    assert "'batchsize'" in message and "4" in message
    assert "did you mean 'batch_size'?" in message


def test_rank_save_is_unknown_in_evaluate_config(workdir):
    path = write_config(workdir, EVALUATE_TEXT + "rank_save: r.npz\n")
    with pytest.raises(UserError, match="unknown key 'rank_save'"):
        load_config(path, "evaluate")


def test_missing_key(workdir):
    with pytest.raises(UserError, match="missing required key 'train_data'"):
        load_config(train_config(workdir, drop=("train_data",)), "train")


@pytest.mark.parametrize("key, value", [
    ("batch_size", "eight"),
    ("batch_size", "0"),
    ("batch_size", "2.5"),
    ("num_classes", "1"),
    ("num_classes", "true"),
    ("learning_rate", "fast"),
    ("learning_rate", "-0.1"),
    ("power", "[1, 2]"),
    ("gpu_id", "0.5"),
    ("model", "3"),
])
def test_wrong_type_names_key_and_value(workdir, key, value):
    with pytest.raises(UserError) as info:
        load_config(train_config(workdir, replace={key: value}), "train")
    message = str(info.value)
    assert "'%s'" % key in message
    assert value.strip("[]").split(",")[0] in message
    assert "\n" not in message


def test_height_not_multiple_of_16(workdir):
    with pytest.raises(UserError, match=r"'height' must be a multiple of 16, got 380"):
        load_config(train_config(workdir, replace={"height": "380"}), "train")


def test_missing_data_file(workdir):
    path = train_config(workdir, replace={"train_data": "data/nope.tfrecords"})
    with pytest.raises(UserError, match=r"'train_data' file 'data/nope.tfrecords' does not exist"):
        load_config(path, "train")


def test_missing_mask_model_def_and_checkpoints(workdir):
    with pytest.raises(UserError, match="'mask'.*'m.npy'"):
        load_config(train_config(workdir, replace={"mask": "m.npy"}), "train")
    with pytest.raises(UserError, match="'model_def'.*'x.json'"):
        load_config(train_config(workdir, replace={"model_def": "x.json"}), "train")
    with pytest.raises(UserError, match="'initialize'.*'init/other.ckpt'"):
        load_config(train_config(workdir, replace={"intialize": "init/other.ckpt"}), "train")
    text = EVALUATE_TEXT.replace("checkpoint: runs/demo", "checkpoint: runs/demo/model.ckpt")
    with pytest.raises(UserError, match="'checkpoint'.*'runs/demo/model.ckpt'"):
        load_config(write_config(workdir, text), "evaluate")


def test_checkpoint_exists(workdir):
    assert checkpoint_exists("init/resnet_v2_50.ckpt")
    assert checkpoint_exists("runs/demo")
    assert not checkpoint_exists("init")  # directory without a checkpoint file
    assert not checkpoint_exists("init/resnet_v2_50")
    assert not checkpoint_exists("")


def test_missing_or_malformed_config_file(workdir):
    with pytest.raises(UserError, match="not found"):
        load_config("nowhere.config", "train")
    with pytest.raises(UserError, match="must be `key: value` lines"):
        load_config(write_config(workdir, "- a\n- b\n"), "train")
    with pytest.raises(UserError, match="empty"):
        load_config(write_config(workdir, ""), "train")
    with pytest.raises(UserError, match=r"not a valid .* at line \d"):
        load_config(write_config(workdir, "a: 1\nb: [1\nc: 2\n"), "train")


def test_overrides_apply_before_validation(workdir):
    path = train_config(workdir, replace={"height": "380"})
    config = load_config(path, "train",
                         overrides=["height=400", "max_iteration=10", "mask=None",
                                    "learning_rate=0.5", "height=416"])
    assert config["height"] == 416
    assert config["max_iteration"] == 10
    assert config["learning_rate"] == 0.5
    with pytest.raises(UserError, match="override.*unknown key 'max_iter'.*'max_iteration'"):
        load_config(path, "train", overrides=["max_iter=10", "height=400"])
    with pytest.raises(UserError, match="key=value"):
        load_config(path, "train", overrides=["height"])


def test_train_settings_with_defaults(workdir):
    path = train_config(workdir, add="flip: true\n")
    assert load_config(path, "train")["flip"] is True
    without_flip = write_config(workdir, TRAIN_TEXT, name="plain.config")
    assert load_config(without_flip, "train")["flip"] is False
    with pytest.raises(UserError, match="unknown key 'flip'"):
        load_config(write_config(workdir, EVALUATE_TEXT + "flip: true\n", "eval.config"),
                    "evaluate")
    with pytest.raises(UserError, match="'flip' must be of type bool .*'yes please'"):
        load_config(path, "train", overrides=["flip=yes please"])


def test_parse_script_args_both_override_forms(workdir):
    path = train_config(workdir)
    config_path, overrides, args = parse_script_args(
        ["-c", path, "--set", "batch_size=4", "--max_iteration", "10",
         "--learning-rate", "0.01", "--mask", "masks/mask.npy"],
        "train", "train")
    assert config_path == path
    assert overrides == ["batch_size=4", "max_iteration=10",
                         "learning_rate=0.01", "mask=masks/mask.npy"]
    config = load_config(config_path, "train", overrides)
    assert (config["batch_size"], config["max_iteration"]) == (4, 10)
    assert config["learning_rate"] == 0.01
    assert config["mask"] == "masks/mask.npy"
    assert args.config == path


def test_parse_script_args_later_override_wins_and_extra_flags(workdir):
    def add_arguments(parser):
        parser.add_argument("--dry-run", action="store_true")

    config_path, overrides, args = parse_script_args(
        ["--config", "x.config", "--batch_size", "2", "--set", "batch_size=3",
         "--dry-run"], "evaluate", "evaluate", add_arguments=add_arguments)
    assert config_path == "x.config"
    assert overrides == ["batch_size=2", "batch_size=3"]
    assert args.dry_run is True


def test_parse_script_args_rejects_keys_of_other_kinds_and_missing_config(capsys):
    with pytest.raises(SystemExit):
        parse_script_args(["-c", "x", "--max_iteration", "3"], "eval", "evaluate")
    with pytest.raises(SystemExit):
        parse_script_args(["--batch_size", "3"], "eval", "evaluate")


def test_apply_gpu_id(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    apply_gpu_id("")
    apply_gpu_id(None)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    apply_gpu_id("0,1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def run_script(tmp_path, body):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""\
        from netcompress.settings.cli import run_main
        from common.errors import UserError

        def main():
        %s

        run_main(main)
        """) % textwrap.indent(textwrap.dedent(body), "    "))
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, env=env, timeout=60)


def test_run_main_user_error_is_one_line_exit_2(tmp_path):
    result = run_script(tmp_path, "raise UserError(\"'height' must be a multiple of 16, got 380\")\n")
    assert result.returncode == 2
    assert result.stderr == "error: 'height' must be a multiple of 16, got 380\n"
    assert result.stdout == ""


def test_run_main_keyboard_interrupt_exit_130(tmp_path):
    result = run_script(tmp_path, "raise KeyboardInterrupt\n")
    assert result.returncode == 130
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_run_main_success_and_bug_pass_through(tmp_path):
    assert run_script(tmp_path, "print('ok')\n").returncode == 0
    result = run_script(tmp_path, "raise RuntimeError('bug')\n")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_atrous_path_key(workdir):
    path = write_config(workdir, EVALUATE_TEXT)
    assert load_config(path, "evaluate", ["atrous_path=space_to_batch"])["atrous_path"] \
        == "space_to_batch"
    with pytest.raises(UserError, match=r"'atrous_path' must be one of auto, native, "
                                        r"space_to_batch, got 'fast'"):
        load_config(path, "evaluate", ["atrous_path=fast"])


def test_config_atrous_names_are_the_builders():
    from models import atrous
    from netcompress.settings.config import ATROUS_PATHS
    assert ATROUS_PATHS == (atrous.AUTO,) + atrous.PATHS


# ---- prun_model.py's settings: one declaration -----------------------------

def _prun_model_header():
    sys.path.insert(0, REPO)
    import prun_model
    from netcompress.settings.config import accepted_keys
    return {name: value for name, value in vars(prun_model).items()
            if name in accepted_keys("prune")}


def test_prune_header_constants_are_the_declared_settings():
    from netcompress.settings.config import KEY_ALIASES, PRUNE_SETTINGS
    header = _prun_model_header()
    legacy = KEY_ALIASES["prune"]
    assert sorted(legacy.get(name, name) for name in header) == \
        sorted(setting.name for setting in PRUNE_SETTINGS)
    assert set(legacy) <= set(header)  # the header keeps the original's names
    settings = load_config(None, "prune", defaults=(header, "header"))
    assert settings["num_classes"] == header["Num_classes"]
    assert settings["rank_file"] == header["save_nvidia_name"]


def test_prune_help_and_readme_table_come_from_the_declaration():
    from netcompress.settings.cli import build_parser
    from netcompress.settings.config import KEY_ALIASES, PRUNE_SETTINGS
    header = _prun_model_header()
    help_text = " ".join(build_parser("prune", "prune", defaults=header).format_help().split())
    for setting in PRUNE_SETTINGS:
        assert f"--{setting.name} VALUE" in help_text
        assert " ".join(setting.help.split()) in help_text
    for legacy, name in KEY_ALIASES["prune"].items():
        assert re.search(rf"--{legacy} VALUE(, --[\w-]+ VALUE)? same as --{name}", help_text)
    # Without the header's values (compress.py), required settings say so.
    compress_help = " ".join(build_parser("compress", "compress").format_help().split())
    assert "object at 0x" not in compress_help
    assert "the trained model to compress (a prefix, or a directory: its newest) " \
           "(required)" in compress_help
    # README's settings table: one row per setting, original names where the
    # header uses them, and nothing else.
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = readme.split("### Settings (header constants)", 1)[1].strip().splitlines()
    rows = [line for line in section[:section.index("")] if line.startswith("|")]
    first_column = [line.split("|")[1] for line in rows[2:]]
    named = {name.strip("` ") for cell in first_column for name in
             cell.replace(" / ", ",").split(",")}
    shown = {({v: k for k, v in KEY_ALIASES["prune"].items()}).get(s.name, s.name)
             for s in PRUNE_SETTINGS}
    assert named == shown


# ---- every script's settings: one declaration each ---------------------------

SCRIPT_KINDS = {"train.py": "train", "evaluate.py": "evaluate",
                "get_oracle_rank.py": "oracle_rank", "predict.py": "predict",
                "export.py": "export", "prun_model.py": "prune", "compress.py": "compress"}


def _script_help(script, monkeypatch):
    """(kind, --help text) of a script, from the parser run_script would build."""
    import importlib
    from netcompress.settings.cli import build_parser
    sys.path.insert(0, REPO)
    module = importlib.import_module(script[:-len(".py")])
    built = {}

    def record(argv, kind, description, main, add_arguments=None, defaults=None,
               check=None):
        parser = build_parser(description, kind, add_arguments,
                              None if defaults is None else defaults[0])
        built.update(kind=kind, help=" ".join(parser.format_help().split()))

    monkeypatch.setattr(module, "run_script", record)
    module.main([])
    return built["kind"], built["help"]


def test_every_setting_has_help_and_every_script_lists_them(monkeypatch):
    from netcompress.settings.config import KEY_ALIASES, REQUIRED, SETTINGS
    assert set(SCRIPT_KINDS.values()) == set(SETTINGS)
    for kind, settings in SETTINGS.items():
        names = [setting.name for setting in settings]
        assert len(names) == len(set(names)), kind
        for setting in settings:
            assert setting.help.strip(), (kind, setting.name)
    for script, kind in SCRIPT_KINDS.items():
        used, help_text = _script_help(script, monkeypatch)
        assert used == kind, script
        for setting in SETTINGS[kind]:
            entry = f"--{setting.name} VALUE"
            if "_" in setting.name:
                entry += f", --{setting.name.replace('_', '-')} VALUE"
            shown = " ".join(setting.help.split())
            assert f"{entry} {shown} (" in help_text, (script, setting.name)
            if kind == "prune":  # prun_model.py shows its header's values
                continue
            if setting.default is REQUIRED:
                assert f"{entry} {shown} (required)" in help_text, (script, setting.name)
            else:
                assert f"{entry} {shown} (now: {setting.default!r})" in help_text, \
                    (script, setting.name)
        for alias, name in KEY_ALIASES[kind].items():
            if alias != name and alias != "intialize":  # intialize: hidden, as before
                assert f"same as --{name}" in help_text, (script, alias)


def test_predict_needs_no_test_data_and_export_does(workdir):
    text = EVALUATE_TEXT.replace("test_data: data/test.tfrecords\n", "")
    path = write_config(workdir, text)
    config = load_config(path, "predict")
    assert config["test_data"] is None and config["batch_size"] == 1
    # an evaluation config serves as it is, its unread test_data unchecked
    assert load_config(write_config(workdir, EVALUATE_TEXT, "full.config"), "predict",
                       ["test_data=data/none.tfrecords"])["checkpoint"] == "runs/demo"
    with pytest.raises(UserError, match="missing required key 'test_data'"):
        load_config(path, "export")
    with pytest.raises(UserError, match="missing required key 'test_data'"):
        load_config(path, "evaluate")


def test_readme_training_keys_are_the_declared_settings():
    """The README's training config lists every train setting, and nothing
    else (the evaluation and ranking keys are described, not listed)."""
    from netcompress.settings.config import KEY_ALIASES, TRAIN_SETTINGS
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    block = readme.split("#### Training (`config/train.config`)\n```\n", 1)[1]
    block = block.split("```", 1)[0]
    listed = [line.split(":", 1)[0] for line in block.splitlines() if line.strip()]
    assert len(listed) == len(set(listed))
    assert {KEY_ALIASES["train"].get(key, key) for key in listed} == \
        {setting.name for setting in TRAIN_SETTINGS}


def test_optional_float_written_without_a_dot(workdir):
    """YAML 1.1 reads 1e-6 as text; an optional float key takes it as the
    required float keys do, and still refuses words."""
    path = train_config(workdir)
    config = load_config(path, "train", ["end_learning_rate=1e-6"])
    assert config["end_learning_rate"] == 1e-6
    with pytest.raises(UserError, match="'end_learning_rate' must be of type float"):
        load_config(path, "train", ["end_learning_rate=small"])


# ---- YAML that means something else than it shows (docs/errors.md) -----------

@pytest.mark.parametrize("add, message", [
    ("batch_size: 4\n", "line 17: key 'batch_size' is given twice (first at line 7)"),
    ("save: &a [1, 2]\nmore: *a\n", "line 17: YAML anchors and aliases"),
])
def test_duplicate_keys_and_aliases_are_refused_naming_the_line(workdir, add, message):
    with pytest.raises(UserError, match=re.escape(message)) as error:
        load_config(train_config(workdir, add=add), "train")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("written, problem", [
    ("010", "a YAML 1.1 octal number (8)"),
    ("0_10", "a YAML 1.1 octal number (8)"),
    ("1:30", "a YAML 1.1 sexagesimal (base 60) number"),
    ("1:30.5", "a YAML 1.1 sexagesimal (base 60) number"),
])
def test_octal_and_sexagesimal_numbers_are_refused(workdir, written, problem):
    path = train_config(workdir, replace={"skip_step": written})
    with pytest.raises(UserError, match=re.escape(
            f"line 8: key 'skip_step': {written} is {problem}")):
        load_config(path, "train")
    with pytest.raises(UserError, match=re.escape(f"override 'skip_step={written}': "
                                                  f"{written} is {problem}")):
        load_config(train_config(workdir), "train", [f"skip_step={written}"])
    # Quoted, it is text (here refused as no integer); decimal numbers and a
    # lone 0 read as written.
    with pytest.raises(UserError, match=re.escape(f"'skip_step' must be a positive integer, "
                                                  f"got '{written}'")):
        load_config(train_config(workdir, replace={"skip_step": f"'{written}'"}), "train")
    path = train_config(workdir, replace={"skip_step": "10", "gpu_id": "0"})
    assert load_config(path, "train", ["batch_size=16"])["skip_step"] == 10


def test_an_alias_bomb_is_refused_before_it_grows(workdir):
    # Nine levels of ten aliases each would be 10**9 list items.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path = train_config(workdir, add="\n".join(lines) + "\n")
    with pytest.raises(UserError, match="line 17: YAML anchors and aliases"):
        load_config(path, "train")


def test_long_values_are_not_echoed(workdir):
    """A message repeats at most about 80 characters of a value or key, and
    a missing file's path up to the longest path Linux takes."""
    long = "x" * 100000
    cases = [  # (replace, add, overrides, characters shown)
        ({"batch_size": long}, "", [], 80),
        ({}, f"{long[:1000]}: 1\n", [], 80),  # YAML keys end at 1024 characters
        ({}, "", [f"{long}=1"], 80),
        ({"model_def": long}, "", [], 4096),
        ({}, "", [f"unknown_key={long}"], 80),
        ({}, "", [f"skip_step={long}"], 80),
    ]
    for replace, add, overrides, shown in cases:
        with pytest.raises(UserError) as error:
            load_config(train_config(workdir, replace=replace, add=add), "train", overrides)
        message = str(error.value)
        assert len(message) < shown + 320 and "x" * (shown + 1) not in message, message[:400]
        assert "x" * shown in message
        assert re.search(r"x'?\.\.\. \((100000|1000) characters\)", message), message[-200:]


def test_cpu_replicas_are_bounded_by_the_cores(workdir, monkeypatch):
    from netcompress.settings import config as config_module
    monkeypatch.setattr(config_module, "_cpu_cores", lambda: 2)
    path = train_config(workdir, replace={"gpu_id": "-1", "batch_size": "1000"})
    assert load_config(path, "train", ["replicas=8"])["replicas"] == 8
    with pytest.raises(UserError, match=r"replicas: 1000 on CPU devices, but this machine "
                                        r"has 2 CPU core\(s\): at most 8"):
        load_config(path, "train", ["replicas=1000"])
