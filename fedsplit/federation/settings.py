"""What the coordinator and the clients need to know besides the plan, and where they find it.

Flower starts the ServerApp and the ClientApps itself (in simulation inside Ray actors, in
deployment as fresh processes per message), so their settings travel as a JSON file named by an
environment variable or by the run config (``flwr run ... -c "fedsplit-settings='PATH'"``), and
as the SuperNode's node config."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from ..transport.security import TLSConfig, load_token

if TYPE_CHECKING:
    from ..plan import Plan

COORDINATOR_ENV = "FEDSPLIT_COORDINATOR_SETTINGS"


class CoordinatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str = Field(description="the federation YAML file")
    run_dir: str
    resume: bool = False
    node_timeout_s: float = Field(default=300.0, gt=0, description="how long to wait for every organisation to connect")
    message_timeout_s: float = Field(default=600.0, gt=0, description="deadline of a round's begin messages")
    round_timeout_s: float = Field(default=3600.0, gt=0, description="deadline of a round's training")
    one_message_per_round: bool = Field(
        default=False,
        description=(
            "begin and collect a round with one message (deployment: every organisation runs its own client apps)"
        ),
    )
    credentials: str | None = Field(
        default=None, description=("`fedsplit certs` output: each organisation's token is checked when it registers")
    )
    release_clients: bool = Field(
        default=False, description="after a successful run, tell every client the run is over (deployed clients exit)"
    )
    simulation: str | None = Field(
        default=None,
        description=(
            "a simulation's registry of workers (fedsplit simulate, flwr run .): sent to every virtual client when "
            "it registers, since Flower starts their actors before the run's workers exist"
        ),
    )

    def load_plan(self) -> Plan:
        from ..plan import load_plan  # here: the clients, which import this module, need no plan (nor torch)

        return load_plan(self.plan)

    def write(self, path: Path) -> Path:
        Path(path).write_text(self.model_dump_json(indent=2))
        return Path(path)

    @classmethod
    def find(cls, run_config: Mapping) -> CoordinatorSettings | None:
        """The settings ``fedsplit simulate`` or ``fedsplit coordinator`` wrote for this run; None
        under a bare ``flwr run .``, where the app makes its own (:mod:`.app_run`)."""
        path = run_config.get("fedsplit-settings") or os.environ.get(COORDINATOR_ENV)
        return cls.model_validate_json(Path(str(path)).read_text()) if path else None


@dataclass(frozen=True)
class ClientSite:
    """One organisation as its client sees it: its worker and the address others reach it at."""

    org: str
    worker: str  # where this client reaches its own worker
    address: str  # where the other organisations reach it
    credentials: Path | None  # None: plaintext without tokens (explicitly insecure)
    layout: str = (
        ""  # layout_hash of the plan the organisation's worker was built from ("" in simulation: the same file)
    )

    @property
    def tls(self) -> TLSConfig | None:
        return TLSConfig.load(self.credentials, self.org) if self.credentials else None

    @property
    def token(self) -> str | None:
        return load_token(self.credentials, self.org) if self.credentials else None

    @classmethod
    def of(cls, node_config: Mapping, registry: str | None = None) -> ClientSite:
        """From the SuperNode's node config (deployment: ``org``, ``worker``, ``address``,
        ``credentials`` or ``insecure``, and ``layout``), or in simulation from the ``registry`` of
        workers that the simulation wrote, by partition id."""
        if "org" in node_config:
            if not node_config.get("credentials") and not node_config.get("insecure"):
                raise RuntimeError("the node config needs credentials=DIR, or insecure=true explicitly")
            creds = node_config.get("credentials")
            worker = str(node_config["worker"])
            return cls(
                str(node_config["org"]),
                worker,
                str(node_config.get("address") or worker),
                Path(str(creds)) if creds else None,
                str(node_config.get("layout", "")),
            )
        if registry is None:
            raise RuntimeError(
                "this node has neither an organisation in its node config (org=NAME) nor a simulation's registry"
            )
        workers = json.loads(Path(registry).read_text())
        org = workers["orgs"][int(node_config["partition-id"])]
        creds = workers.get("credentials")
        return cls(org, workers["workers"][org], workers["workers"][org], Path(creds) if creds else None)
