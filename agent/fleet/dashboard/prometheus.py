"""The fleet as Prometheus series: ``GET /metrics`` on the dashboard's server.

One scrape gives every device, model and rollout the dashboard knows, as labelled gauges (and
counters where the device reports totals), in the text exposition format 0.0.4. Units follow
Prometheus' conventions (seconds, bytes, ratios as percent where the device reports percent).
:data:`SERIES` lists every family with its help; ``docs/grafana/edge-fleet.json`` draws them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from agent.fleet.dashboard.model import FleetModel

# name -> (type, help)
SERIES: dict[str, tuple[str, str]] = {
    "edge_fleet_broker_connected": ("gauge", "1 while the dashboard's broker session is up"),
    "edge_fleet_devices": ("gauge", "devices known to the fleet, by state"),
    "edge_fleet_device_online": ("gauge", "1 online, 0 offline (absent: never said)"),
    "edge_fleet_device_last_seen_timestamp_seconds": (
        "gauge",
        "the newest time the device put on a message (its clock)",
    ),
    "edge_fleet_device_info": ("gauge", "1 per device: its agent version, hardware and groups"),
    "edge_fleet_device_error": ("gauge", "1 while the device refuses its deployment document"),
    "edge_fleet_model_info": ("gauge", "1 per device and model: version, variant, runtime, phase"),
    "edge_fleet_model_active": ("gauge", "1 when the model's deployment is active"),
    "edge_fleet_model_progress_percent": ("gauge", "download progress of a deployment"),
    "edge_fleet_model_error": ("gauge", "1 while the model's deployment reports an error"),
    "edge_fleet_model_requests_total": ("counter", "inference requests answered"),
    "edge_fleet_model_errors_total": ("counter", "inference requests answered with an error"),
    "edge_fleet_model_requests_per_second": ("gauge", "requests per second, newest reading"),
    "edge_fleet_model_errors_per_second": ("gauge", "errors per second, newest reading"),
    "edge_fleet_model_latency_seconds": ("gauge", "latency quantiles, newest reading"),
    "edge_fleet_device_cpu_percent": ("gauge", "CPU use of the whole box"),
    "edge_fleet_device_memory_used_bytes": ("gauge", "memory in use on the box"),
    "edge_fleet_device_memory_percent": ("gauge", "memory in use on the box, percent"),
    "edge_fleet_agent_resident_memory_bytes": ("gauge", "the agent's resident memory"),
    "edge_fleet_device_disk_free_bytes": ("gauge", "free space where the state directory is"),
    "edge_fleet_gpu_utilization_percent": ("gauge", "GPU utilisation"),
    "edge_fleet_gpu_memory_used_bytes": ("gauge", "GPU memory in use"),
    "edge_fleet_gpu_memory_total_bytes": ("gauge", "GPU memory"),
    "edge_fleet_gpu_temperature_celsius": ("gauge", "GPU temperature"),
    "edge_fleet_rollout_info": ("gauge", "1 per rollout: its status and models"),
    "edge_fleet_rollout_devices": ("gauge", "devices a rollout is for"),
    "edge_fleet_rollout_active_devices": ("gauge", "of those, active on what it deploys"),
    "edge_fleet_rollout_failures": ("gauge", "devices of a rollout that failed"),
    "edge_fleet_rollout_wave": ("gauge", "the wave a rollout is at (1-based)"),
}

MIB = 1024 * 1024
_GPU = re.compile(r"^gpu(\d+)\.(util_pct|mem_used_mb|mem_total_mb|temp_c)$")
_GPU_SERIES = {
    "util_pct": ("edge_fleet_gpu_utilization_percent", 1.0),
    "mem_used_mb": ("edge_fleet_gpu_memory_used_bytes", MIB),
    "mem_total_mb": ("edge_fleet_gpu_memory_total_bytes", MIB),
    "temp_c": ("edge_fleet_gpu_temperature_celsius", 1.0),
}
# device-wide metric -> (series, factor)
_DEVICE_SERIES = {
    "cpu.percent": ("edge_fleet_device_cpu_percent", 1.0),
    "mem.used_mb": ("edge_fleet_device_memory_used_bytes", MIB),
    "mem.percent": ("edge_fleet_device_memory_percent", 1.0),
    "proc.rss_mb": ("edge_fleet_agent_resident_memory_bytes", MIB),
    "disk.state_free_mb": ("edge_fleet_device_disk_free_bytes", MIB),
}
_MODEL_SERIES = {
    "requests": ("edge_fleet_model_requests_total", 1.0, {}),
    "errors": ("edge_fleet_model_errors_total", 1.0, {}),
    "rps": ("edge_fleet_model_requests_per_second", 1.0, {}),
    "errors_per_s": ("edge_fleet_model_errors_per_second", 1.0, {}),
    "p50_ms": ("edge_fleet_model_latency_seconds", 0.001, {"quantile": "0.5"}),
    "p99_ms": ("edge_fleet_model_latency_seconds", 0.001, {"quantile": "0.99"}),
}


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, Any]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items() if v is not None)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Out:
    def __init__(self) -> None:
        self.samples: dict[str, list[str]] = {name: [] for name in SERIES}

    def add(self, name: str, labels: dict[str, Any], value: float) -> None:
        self.samples[name].append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        lines = []
        for name, (kind, text) in SERIES.items():
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(self.samples[name])
        return "\n".join(lines) + "\n"


def render(model: FleetModel) -> str:
    """The exposition text for one scrape."""
    out = _Out()
    snap = model.snapshot()
    out.add("edge_fleet_broker_connected", {}, 1 if snap["broker"]["connected"] else 0)
    for state, n in snap["counts"].items():
        out.add("edge_fleet_devices", {"state": state}, n)
    for row in snap["devices"]:
        _device(out, row, model)
    for ro in snap["rollouts"]:
        _rollout(out, ro)
    return out.text()


def _device(out: _Out, row: dict[str, Any], model: FleetModel) -> None:
    dev = {"device": row["id"]}
    if row["online"] is not None:
        out.add("edge_fleet_device_online", dev, 1 if row["online"] else 0)
    if row["last_seen"]:
        seen = datetime.fromisoformat(row["last_seen"]).timestamp()
        out.add("edge_fleet_device_last_seen_timestamp_seconds", dev, seen)
    info = {
        **dev,
        "agent_version": row["agent"] or "",
        "hardware": row["hardware"],
        "arch": row["arch"] or "",
        "groups": ",".join(row["groups"]),
    }
    out.add("edge_fleet_device_info", info, 1)
    if row["error"]:
        out.add("edge_fleet_device_error", {**dev, "code": row["error"]["code"]}, 1)
    for m in row["models"]:
        lab = {**dev, "model": m["name"]}
        out.add(
            "edge_fleet_model_info",
            {
                **lab,
                "version": m["version"] or "",
                "variant": m["variant"] or "",
                "runtime": m["runtime"] or "",
                "phase": m["phase"],
            },
            1,
        )
        out.add("edge_fleet_model_active", lab, 1 if m["phase"] == "active" else 0)
        if m["progress"] is not None:
            out.add("edge_fleet_model_progress_percent", lab, m["progress"])
        if m["error"]:
            out.add("edge_fleet_model_error", {**lab, "code": m["error"]["code"]}, 1)
    for name, value in sorted(model.latest(row["id"]).items()):
        _metric(out, dev, name, value)


def _metric(out: _Out, dev: dict[str, Any], name: str, value: float) -> None:
    if name in _DEVICE_SERIES:
        series, factor = _DEVICE_SERIES[name]
        out.add(series, dev, value * factor)
        return
    g = _GPU.match(name)
    if g:
        series, factor = _GPU_SERIES[g.group(2)]
        out.add(series, {**dev, "gpu": g.group(1)}, value * factor)
        return
    if name.startswith("model."):
        model_name, _, what = name[len("model.") :].rpartition(".")
        if model_name and what in _MODEL_SERIES:
            series, factor, extra = _MODEL_SERIES[what]
            out.add(series, {**dev, "model": model_name, **extra}, value * factor)


def _rollout(out: _Out, ro: dict[str, Any]) -> None:
    if "waves" not in ro:
        return
    lab = {"rollout": ro["rollout"]}
    models = ",".join(f"{n}={v}" for n, v in sorted(ro["models"].items()))
    out.add("edge_fleet_rollout_info", {**lab, "status": ro["status"], "models": models}, 1)
    out.add("edge_fleet_rollout_devices", lab, ro["devices"])
    out.add("edge_fleet_rollout_active_devices", lab, ro["active"])
    out.add("edge_fleet_rollout_failures", lab, len(ro["failures"]))
    out.add("edge_fleet_rollout_wave", lab, ro["wave"])
