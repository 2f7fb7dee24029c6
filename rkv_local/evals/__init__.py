"""Evaluation tooling: speed and memory (``bench``), fidelity against the full cache
(``fidelity``) and task accuracy (``tasks``), each also an ``rkv-local`` command.

The runtime (``rkv_local.Llama`` and what it needs) never imports this package.
"""
from __future__ import annotations

import argparse
from types import ModuleType


def add_commands(sub: argparse._SubParsersAction, parser_class: type[argparse.ArgumentParser]) -> None:
    """``bench`` and ``eval fidelity|tasks`` as subcommands of the ``rkv-local`` parser."""
    from . import bench, fidelity, tasks

    def add(parent: argparse._SubParsersAction, name: str, module: ModuleType) -> None:
        p = parent.add_parser(name, help=module.HELP, description=module.__doc__, epilog=module.EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)

    add(sub, "bench", bench)
    evaluate = sub.add_parser("eval", help="fidelity and task accuracy against the full cache")
    what = evaluate.add_subparsers(dest="eval_command", metavar="WHAT", required=True, parser_class=parser_class)
    add(what, "fidelity", fidelity)
    add(what, "tasks", tasks)
