"""What a device reports of itself, in the wire models' terms."""

from __future__ import annotations

from agent.runtime.probe import HostProfile
from agent.transport.messages import HardwareProfile


def reported_hardware(profile: HostProfile) -> HardwareProfile:
    """The probe's findings in the reported state's terms."""
    details = {k[:64]: v[:1024] for k, v in list(profile.details().items())[:32]}
    return HardwareProfile(
        arch=profile.architecture[:32] or "unknown",
        cpu_count=max(1, profile.cpu_cores),
        memory_mb=profile.memory_total_mb,
        accelerators=profile.accelerators[:16],
        details=details,
    )
