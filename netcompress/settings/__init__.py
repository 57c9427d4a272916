"""Every script's settings (config.py) and its command line (cli.py)."""
