"""Everything the coordinator sends through its ROUTER, each in the protocol of its peer.

The ROUTER is ROUTER_MANDATORY with no send high-water mark: a send to a peer that has gone
fails at once (EHOSTUNREACH), is logged and dropped, and a client found gone so is noted in
``gone_clients`` (its requests are freed after the wake-up, never in the middle of one). Frames
go out through pyzmq's Cython socket method, bypassing its Python wrappers on the hot path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from typing import Any

import zmq

from ..protocol import ErrorCode, Headers
from .control import next_019
from .dialects import CONTROL_TO_019, Dialect, Wire019, failed_record, submit_for_019
from .engines import EngineRegistry
from .wire import HEADER_ONLY, encode

logger = logging.getLogger("megatron_coord.coordinator")

HEADER_ONLY_019 = {h: encode([int(v)]) for h, v in CONTROL_TO_019.items()}
_zmq_send = zmq.backend.Socket.send
_SNDMORE = int(zmq.SNDMORE)


class Outbox:
    """The ROUTER's sending side: plain, quiet, error, submit and control sends."""

    def __init__(
        self, socket: zmq.Socket, registry: EngineRegistry, clients: dict[bytes, Dialect]
    ) -> None:
        self.socket = socket
        self.registry = registry
        self.clients = clients
        self.gone_clients: set[bytes] = set()  # found gone by a send: freed after the wake-up
        self._speaks_019 = registry.speaks_019

    def send(self, identity: bytes, payload: bytes) -> bool:
        """Send one message; False (and logged) if the peer is gone."""
        sock = self.socket
        try:
            _zmq_send(sock, identity, _SNDMORE)
            _zmq_send(sock, payload, 0)
            return True
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            logger.info("peer %r is gone; dropped a message for it", identity)
            if identity in self.clients:
                self.gone_clients.add(identity)  # its requests are freed after this wake-up
            return False

    def take_gone_clients(self) -> set[bytes]:
        """The clients sends found gone since the last call."""
        gone, self.gone_clients = self.gone_clients, set()
        return gone

    def send_quietly(self, identity: bytes, payload: bytes) -> None:
        """Send if the peer is still connected; never mistake an engine for a gone client."""
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart([identity, payload], zmq.NOBLOCK)

    def send_error(
        self, identity: bytes, client_request_id: Any, code: ErrorCode, text: str
    ) -> None:
        """ERROR to ``identity`` if it speaks our protocol; a 0.19 client gets a FAILED record
        for its request (with ``client_request_id`` None: nothing, as Megatron's 0.16 peers)."""
        engine = self.registry.engines.get(identity)
        # strangers never said CONNECT: they get the error
        dialect = engine.dialect if engine is not None else self.clients.get(identity, Dialect.OURS)
        if dialect is Dialect.OURS:
            self.send(identity, encode([int(Headers.ERROR), client_request_id, code.value, text]))
        elif dialect is Dialect.MEGATRON_019 and engine is None and client_request_id is not None:
            record = failed_record(client_request_id, code.value, text)
            self.send(identity, encode([int(Wire019.ENGINE_REPLY), client_request_id, record]))

    def send_submit(self, identity: bytes, frame: bytes) -> bool:
        """Send a SUBMIT_REQUEST frame (kept in our header) in the engine's protocol."""
        if identity in self._speaks_019:
            frame = submit_for_019(frame)
        return self.send(identity, frame)

    def send_control(self, identity: bytes, header: Headers) -> None:
        """A control signal to one engine, in its protocol; a 0.19 engine only gets the
        signals its state allows (it asserts against the others) and follows 0.19's states."""
        engine = self.registry.engines[identity]
        if engine.dialect is not Dialect.MEGATRON_019:
            self.send(identity, HEADER_ONLY[header])
            return
        new_state = next_019(engine.state_019, header)
        if new_state is None:
            logger.info(
                "not sending %s to 0.19 engine %r: it is %s",
                header.name,
                identity,
                engine.state_019.value,
            )
            return
        engine.state_019 = new_state
        self.send(identity, HEADER_ONLY_019[header])
