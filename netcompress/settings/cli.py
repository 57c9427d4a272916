"""Command-line plumbing shared by the scripts: `-c CONFIG` plus overrides,
the entry helper ``run_script`` (parse -> load settings -> choose device ->
import TensorFlow quietly -> run), and ``run_main``, which turns UserError
into a one-line message."""

import argparse
import sys

from common.errors import INTERRUPT_EXIT, USER_ERROR_EXIT, UserError
from netcompress.settings.config import KEY_ALIASES, REQUIRED, SETTINGS, accepted_keys, \
    apply_gpu_id, load_config



class _AppendOverride(argparse.Action):
    """Collects `--set k=v` and `--k v` into one ordered list, so a later
    override on the command line wins over an earlier one whatever its form."""

    def __init__(self, option_strings, dest, config_key=None, **kwargs):
        self.config_key = config_key
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        overrides = list(getattr(namespace, self.dest, None) or [])
        if self.config_key is None:
            if "=" not in value:
                parser.error("%s expects key=value, got %r" % (option_string, value))
            overrides.append(value)
        else:
            overrides.append("%s=%s" % (self.config_key, value))
        setattr(namespace, self.dest, overrides)


def _key_help(kind, key, defaults):
    """--help text of a key: its setting's help and current value (the
    script's ``defaults``, else the declared default)."""
    target = KEY_ALIASES[kind].get(key, key)
    if target != key:
        return f"same as --{target}"
    setting = next(setting for setting in SETTINGS[kind] if setting.name == key)
    current = (defaults or {}).get(key, setting.default)
    if current is REQUIRED:
        return f"{setting.help} (required)"
    return f"{setting.help} (now: {current!r})"


def build_parser(description, kind, add_arguments=None, defaults=None):
    """The parser behind parse_script_args (exposed for --help tests/docs).
    ``defaults``: the settings a script has without a config file; -c is
    then optional."""
    # No abbreviations: with a flag per config key they would be ambiguous or
    # silently pick the wrong key.
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("-c", "--config", required=defaults is None, metavar="FILE",
                        help="config file (`key: value` lines)")
    overrides = parser.add_argument_group(
        "config overrides", "replace a config value for this run; values are "
        "read like YAML scalars (10, 1.0e-4, None, text)")
    overrides.add_argument("--set", dest="overrides", action=_AppendOverride,
                           default=[], metavar="KEY=VALUE",
                           help="override any config key (repeatable)")
    for key in accepted_keys(kind):
        flags = ["--" + key]
        if "_" in key:
            flags.append("--" + key.replace("_", "-"))
        overrides.add_argument(*flags, dest="overrides", action=_AppendOverride,
                               config_key=key, metavar="VALUE",
                               help=argparse.SUPPRESS if key == "intialize"
                               else _key_help(kind, key, defaults))
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def parse_script_args(argv, description, kind, add_arguments=None, defaults=None):
    """Parse a script's command line.

    argv: arguments without the program name (None -> sys.argv[1:]).
    kind: config kind (a key of config.SETTINGS); every key of it becomes a
    `--KEY VALUE` flag. `add_arguments(parser)` may add script-specific
    flags.
    Returns (config_path, overrides, namespace), overrides being the
    'key=value' strings in command-line order, ready for load_config.
    """
    parser = build_parser(description, kind, add_arguments, defaults)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.config, list(args.overrides), args


def run_script(argv, kind, description, main, add_arguments=None, defaults=None,
               check=None):
    """What every script does: parse the command line, load and check its
    settings, ``check(config, args)`` (work that needs no TensorFlow, so that
    mistakes show at once), make only the configured GPU(s) visible, import
    TensorFlow quietly in graph mode, then ``main(config, args, prepared)``,
    ``prepared`` being what ``check`` returned (None without one).
    ``defaults``: (values, source) a script has without a config file."""
    from common.runtime import graph_mode

    config_path, overrides, args = parse_script_args(
        argv, description, kind, add_arguments,
        defaults=None if defaults is None else defaults[0])
    config = load_config(config_path, kind, overrides, defaults=defaults)
    # Before check: reading a checkpoint's description there imports TensorFlow,
    # which must see only the configured GPU(s).
    apply_gpu_id(config["gpu_id"])
    prepared = check(config, args) if check is not None else None
    graph_mode()
    return main(config, args, prepared)


def run_main(main_fn):
    """Run main_fn() and return its result; report a UserError as
    `error: <message>` on one line (exit 2, or the error's ``exit_status``:
    1 for a failed TensorFlow op) and Ctrl-C as exit 130, both
    without a traceback. Other exceptions propagate: they are bugs."""
    try:
        return main_fn()
    except UserError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print("error: %s" % (message or type(exc).__name__), file=sys.stderr)
        sys.exit(getattr(exc, "exit_status", USER_ERROR_EXIT))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT)
