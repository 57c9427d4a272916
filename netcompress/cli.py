"""Command-line plumbing shared by the scripts: `-c CONFIG` plus overrides,
and a top-level wrapper that turns UserError into a one-line message."""

import argparse
import sys

from netcompress.config import accepted_keys
from common.errors import UserError

USER_ERROR_EXIT = 2
INTERRUPT_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C


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


def build_parser(description, kind, add_arguments=None, optional=None):
    """The parser behind parse_script_args (exposed for --help tests/docs)."""
    # No abbreviations: with a flag per config key they would be ambiguous or
    # silently pick the wrong key.
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("-c", "--config", required=True, metavar="FILE",
                        help="config file (`key: value` lines)")
    overrides = parser.add_argument_group(
        "config overrides", "replace a config value for this run; values are "
        "read like YAML scalars (10, 1.0e-4, None, text)")
    overrides.add_argument("--set", dest="overrides", action=_AppendOverride,
                           default=[], metavar="KEY=VALUE",
                           help="override any config key (repeatable)")
    for key in accepted_keys(kind, optional):
        flags = ["--" + key]
        if "_" in key:
            flags.append("--" + key.replace("_", "-"))
        overrides.add_argument(*flags, dest="overrides", action=_AppendOverride,
                               config_key=key, metavar="VALUE",
                               help=argparse.SUPPRESS if key == "intialize" else None)
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def parse_script_args(argv, description, kind, add_arguments=None, optional=None):
    """Parse a script's command line.

    argv: arguments without the program name (None -> sys.argv[1:]).
    kind: config kind ('train', 'evaluate', 'oracle_rank'); every key of it
    becomes a `--KEY VALUE` flag. `optional` (the dict given to load_config)
    adds its keys as flags too. `add_arguments(parser)` may add
    script-specific flags.
    Returns (config_path, overrides, namespace), overrides being the
    'key=value' strings in command-line order, ready for load_config.
    """
    parser = build_parser(description, kind, add_arguments, optional)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.config, list(args.overrides), args


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
