"""``vlmbatch emulate``: the endpoint emulator alone (the same options as ``python -m emulator``)."""

from __future__ import annotations

import typer

DEFAULT_PORT = 8000


def register(app: typer.Typer) -> None:
    @app.command(
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        help="Run the endpoint emulator (an OpenAI-compatible stand-in for the model) on loopback, "
        "port 8000 unless --port says otherwise. `vlmbatch emulate --help` lists its options.",
    )
    def emulate(ctx: typer.Context) -> None:
        from emulator import serve, settings_from_args  # its web server: a quarter second, emulate only

        # by default on the port `vlmbatch run` looks at
        serve(settings_from_args(list(ctx.args), prog="vlmbatch emulate", port=DEFAULT_PORT))
