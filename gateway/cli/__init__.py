"""The ``kling-gateway`` command line, one module per command family.

``main.py`` is the entry point (``gateway.cli.main:main``); ``common.py`` holds what the families share. Each
family module has ``add_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None``, which
adds its subcommand(s) and sets each one's handler with ``set_defaults(handler=run)``; a handler takes the parsed
``argparse.Namespace`` and returns the exit status (``run(args) -> int``). A new family is registered by adding
its module to ``main.COMMAND_FAMILIES``.
"""
