"""``flwr run .``: fedsplit as a plain Flower app on a local simulation SuperLink.

``fedsplit simulate`` and ``fedsplit coordinator`` start the organisations' workers and write the
coordinator's settings before Flower starts the ServerApp. Under a bare ``flwr run`` nobody has,
so the ServerApp does it itself from the run config (``[tool.flwr.app.config]`` in
``pyproject.toml``, overridden with ``flwr run ... -c "key=value"``): it loads the plan, starts
the workers on this host as ``fedsplit simulate`` would, and tells each virtual client which
organisation it is when it registers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from logging import INFO
from pathlib import Path

from flwr.common import log
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..plan import PlanError, load_plan
from .exchange import FederationError
from .settings import CoordinatorSettings
from .simulate import SimulationFailed, SimulationOptions, simulation_workers

STARTUP_ERRORS = (FederationError, PlanError, SimulationFailed)  # what stops a run before it starts

# Where relative paths of the run config lead: the app's own directory (the repository, or the
# copy of it that Flower installed from the app's FAB), which holds the shipped plans and data.
APP_DIR = Path(__file__).resolve().parents[2]


class AppRunConfig(BaseModel):
    """The run config keys this app reads (``-c "plan='...' rounds=2"``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    plan: str = Field(description="the federation YAML file, relative to the app's directory or absolute")
    rounds: int = Field(default=0, ge=0, description="rounds to train; 0: the plan's")
    steps: int = Field(default=0, ge=0, description="steps per round; 0: the plan's")
    runs_dir: str = Field(
        default="", alias="runs-dir", description="where the run directory goes; empty: runs/ in the app's directory"
    )
    device: str = Field(default="", description="the workers' torch device; empty: cuda when there is one, else cpu")

    @classmethod
    def of(cls, run_config: Mapping) -> AppRunConfig:
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
            raise FederationError(
                f"the run config (flwr run -c, [tool.flwr.app.config]) is not valid: {problems}"
            ) from None

    def path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else APP_DIR / path


@contextmanager
def app_simulation(run_config: Mapping, supernodes: int) -> Iterator[CoordinatorSettings]:
    """The workers of the run config's plan, serving on this host, and the coordinator's settings
    for them; ``supernodes``: how many virtual nodes this federation has (one per organisation)."""
    config = AppRunConfig.of(run_config)
    plan = load_plan(config.path(config.plan))
    changes = {k: v for k, v in (("rounds", config.rounds), ("steps_per_round", config.steps)) if v}
    if changes:
        plan = plan.with_training(**changes)
    if supernodes != len(plan.orgs):
        raise FederationError(
            f"plan {plan.name!r} has {len(plan.orgs)} organisations ({', '.join(plan.orgs)}) and this simulation "
            f"{supernodes} SuperNodes: run it with flwr run . local --federation-config "
            f'"num-supernodes={len(plan.orgs)}"'
        )
    options = SimulationOptions(
        runs_root=config.path(config.runs_dir or "runs"), device=config.device or None, insecure=False
    )
    with simulation_workers(plan, options) as (_, settings):
        log(INFO, "fedsplit: plan %s, run directory %s", plan.name, settings.run_dir)
        yield settings
