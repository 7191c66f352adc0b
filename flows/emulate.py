"""``vlmbatch emulate``: the endpoint emulator alone (the same options as ``python -m emulator``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        help="Run the endpoint emulator (an OpenAI-compatible stand-in for the model) on loopback. "
        "`vlmbatch emulate --help` lists its options.",
    )
    def emulate(ctx: typer.Context) -> None:
        from emulator import serve, settings_from_args

        serve(settings_from_args(ctx.args))
