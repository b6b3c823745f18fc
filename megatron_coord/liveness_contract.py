"""One liveness contract per pair of peers, reconciled at their handshake, never configured twice.

Silence is judged by one side only, and the other side's cadence is made to fit that judge's
timeout by the protocol, so two settings in two processes can no longer disagree:

* **Replicas.** The coordinator judges each replica of ours: one it hears nothing from for its
  ``engine_timeout`` is declared dead. REGISTER says how often the replica would heartbeat
  (``heartbeat_interval``; ``heartbeat_interval_fixed`` when its user set it), and REGISTER_ACK
  answers with the coordinator's timeout and the cadence to beat at (``engine_cadence``): a
  quarter of the timeout, never slower than the replica's own interval. A replica whose user
  forced a slower interval is refused, with a message naming both settings. The replica's
  heartbeats during steps (engine/step_heartbeat.py) follow the same cadence.
* **Clients.** A client of ours judges the coordinator: it pings a quiet coordinator and
  declares it lost after its own ``coordinator_timeout``; the coordinator answers each ping at
  once and judges a client only by its connection (ZMTP heartbeats, which libzmq answers
  whatever the client's code does). So the judge and both settings live in the client: CONNECT
  says them and CONNECT_ACK confirms the ping cadence by the rule of this module
  (``client_cadence``: a ping and its answer must fit in the timeout at the watchdog's
  half-interval granularity, with room to spare).

Megatron-core's engines and clients never heartbeat and never say either setting: they get
neither answer, and nothing about them changes.
"""

from __future__ import annotations

from typing import Any

# A replica's default heartbeat interval, when its user did not set one.
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
# A replica heartbeats at least this many times per engine timeout of its coordinator.
ENGINE_BEATS_PER_TIMEOUT = 4
# A client pings a quiet coordinator at least this many times per its coordinator_timeout.
CLIENT_PINGS_PER_TIMEOUT = 3
MIN_INTERVAL_S = 0.01  # never asked to beat faster than this


class LivenessMismatch(ValueError):
    """A peer cannot keep the contract (its interval is forced above the safe cadence)."""


def _seconds(value: Any, name: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def engine_cadence(engine_timeout: float, interval: Any, fixed: bool) -> float | None:
    """The heartbeat interval a replica must keep for a coordinator that declares it dead after
    ``engine_timeout`` s of silence: its own ``interval`` if that is safe, else the safe
    cadence. None: the replica does not heartbeat (never watched for silence). Raises
    LivenessMismatch if ``fixed`` (its user set it) and too slow; ValueError if no interval."""
    own = _seconds(interval, "heartbeat_interval", allow_none=True)
    if own is None:
        return None
    safe = max(engine_timeout / ENGINE_BEATS_PER_TIMEOUT, MIN_INTERVAL_S)
    if own <= safe:
        return own
    if fixed:
        raise LivenessMismatch(
            f"this replica heartbeats every {own:g} s (--heartbeat-interval), but the "
            f"coordinator declares a replica dead after {engine_timeout:g} s without a word "
            f"(--engine-timeout): it must heartbeat at least every {safe:g} s (1/"
            f"{ENGINE_BEATS_PER_TIMEOUT} of it). Lower --heartbeat-interval to {safe:g} or "
            f"leave it unset (the replica then follows the coordinator), or raise the "
            f"coordinator's --engine-timeout to {own * ENGINE_BEATS_PER_TIMEOUT:g} or more"
        )
    return safe


def client_cadence(coordinator_timeout: Any, interval: Any) -> float:
    """The ping interval of a client that declares the coordinator lost after
    ``coordinator_timeout`` s of silence: its own ``interval``, or faster if that is unsafe."""
    timeout = _seconds(coordinator_timeout, "coordinator_timeout")
    own = _seconds(interval, "heartbeat_interval")
    return min(own, max(timeout / CLIENT_PINGS_PER_TIMEOUT, MIN_INTERVAL_S))


def client_settings(interval: float | None, coordinator_timeout: float) -> dict[str, float]:
    """What a client's CONNECT says of how it judges the coordinator ({}: it never pings)."""
    if interval is None:
        return {}
    return {"heartbeat_interval": interval, "coordinator_timeout": coordinator_timeout}


def confirmed_cadence(connect_ack: list[Any], own: float | None) -> float | None:
    """The ping interval a CONNECT_ACK confirms (None: it says none, keep ``own``)."""
    if own is None or len(connect_ack) != 2 or not isinstance(connect_ack[1], dict):
        return None
    interval = connect_ack[1].get("heartbeat_interval")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        return None
    return float(interval) if 0 < interval <= own else None
