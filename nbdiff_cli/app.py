"""The `nbdiff` command line: registers one command per module, nothing else.

Each entry of COMMANDS is "module:function". Command modules import only typer/rich at the top
and load torch/transformers inside the function, so `nbdiff --help` stays instant.
"""

from __future__ import annotations

import importlib

import typer

from nbdiff_cli.console import handle_errors

# name -> "module:function" (order = order in --help)
COMMANDS: dict[str, str] = {
    "convert": "nbdiff_cli.convert:convert",
    "distill": "nbdiff_cli.distill:distill",
    "adapt": "nbdiff_cli.adapt:adapt",
    "plot": "nbdiff_cli.plot:plot",
    "info": "nbdiff_cli.info:info",
    "generate": "nbdiff_cli.generate:generate",
    "chat": "nbdiff_cli.chat:chat",
    "visualize": "nbdiff_cli.visualize:visualize",
    "eval": "nbdiff_cli.eval:eval_",
    "bench": "nbdiff_cli.bench:bench",
    "serve": "nbdiff_cli.serve.command:serve",
    "export-drafter": "nbdiff_cli.export_drafter:export_drafter",
}

app = typer.Typer(
    name="nbdiff",
    help="Turn an autoregressive LM into a block-diffusion LM (NBDiff): convert, adapt, chat, visualize.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    for name, target in COMMANDS.items():
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        app.command(name)(handle_errors(func))


def _show_version(value: bool) -> None:
    # runs while options are parsed, so `nbdiff --version` needs no command after it
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version as pkg_version

    try:
        typer.echo(f"nbdiff {pkg_version('nbdiff')}")
    except PackageNotFoundError:
        typer.echo("nbdiff (not installed)")
    raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Show the version and exit.", is_eager=True,
                                 callback=_show_version, expose_value=True),
) -> None:
    pass


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
