"""``edge-agent serve --bundle FILE --trust ROOT_OR_KEYRING``: one verified bundle, served locally.

No broker and no state directory: the bundle is verified as a device verifies it (signed
descriptor, every byte, the manifest), unpacked into a temporary directory, its variant and
runtime chosen for this box, loaded and self-tested through the same slot layer the agent uses,
and served on the same local API. For trying a bundle on a box, and for tests.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from agent.bundle.unpack import unpack_bundle
from agent.errors import EdgeAgentError, ToolError
from agent.runtime.choice import Choice, RuntimeConfig, check_memory, choose
from agent.runtime.probe import probe
from agent.serving.api import ApiSettings, InferenceApi
from agent.serving.metrics import ApiMetrics
from agent.serving.server import ApiServer, serve_api
from agent.serving.slots import Candidate, SlotManager, SlotSettings
from agent.transport.messages import Phase
from agent.verify import verify_file

log = logging.getLogger("agent.serving")


@dataclass
class Standalone:
    """A bundle being served; :meth:`close` stops the API and removes the unpacked copy."""

    candidate: Candidate
    choice: Choice
    models: SlotManager
    server: ApiServer
    workdir: Path

    @property
    def runtime(self) -> str:
        served = self.models.describe(self.candidate.name)
        return served.runtime if served is not None else "?"

    def close(self) -> None:
        self.server.stop()
        self.models.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def serve_bundle(
    bundle: Path,
    trust: Path,
    api: ApiSettings,
    *,
    runtime: RuntimeConfig | None = None,
    variant: str | None = None,
    load_timeout_s: float = 900.0,
) -> Standalone:
    """Verify, unpack, choose, load, self-test, then listen. Raises the project's errors."""
    runtime = runtime or RuntimeConfig()
    verified = verify_file(bundle, trust, now=datetime.now(timezone.utc))
    d = verified.descriptor
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-serve-"))
    try:
        dest = workdir / d.bundle_sha256
        manifest = unpack_bundle(bundle, dest, manifest_sha256=d.manifest_sha256)
        profile = probe()
        choice = choose(manifest, profile, runtime.policy, variant=variant)
        chosen = manifest.variant(choice.variant_id)
        check_memory(chosen, profile, choice.backend)
        candidate = Candidate(
            name=manifest.name,
            version=manifest.version,
            release=d.release,
            bundle_sha256=d.bundle_sha256,
            directory=dest,
            manifest=manifest,
            variant=chosen,
            backend=choice.backend,
            settings=runtime.settings_for(choice.backend),
        )
        failure: list[EdgeAgentError | None] = []
        done = threading.Event()

        def phase(
            name: str, p: Phase, error: EdgeAgentError | None, progress: float | None
        ) -> None:
            if p == Phase.FAILED:
                failure.append(error)
            if p in (Phase.ACTIVE, Phase.FAILED):
                done.set()

        metrics = ApiMetrics()
        models = SlotManager(
            SlotSettings(probation_s=0, load_timeout_s=load_timeout_s),
            on_phase=phase,
            on_swap=metrics.on_swap,
        )
        if models.deploy(candidate).result() != Phase.ACTIVE:
            models.close()
            raise failure[0] if failure and failure[0] else ToolError("the model did not load")
        app = InferenceApi(models, api, metrics=metrics)
        try:
            server = serve_api(app, api)
        except BaseException:
            app.close()
            models.close()
            raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Standalone(candidate, choice, models, server, workdir)
