"""The fedmm ServerApp.

`app` reads its config from the run config (`flwr run .`); `fedmm simulate` builds one with
`make_server_app(config)` because Flower's simulation API passes no run config.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmm.core.config import config_from_flat
from fedmm.core.schema import ConfigError, RunConfig
from server_app.runner import run_federation


def make_server_app(run: RunConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = run if run is not None else config_from_flat(context.run_config)
        if not cfg.out:
            raise ConfigError("config key 'out' (the results folder) is required, e.g. --run-config 'out=\"results\"'")
        run_federation(grid, cfg)

    return app


app = make_server_app()
