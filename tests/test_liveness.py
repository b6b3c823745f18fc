"""PeerMonitor on a real ROUTER: a closed connection is reported once, for the right peer, even
when the kernel hands its file descriptor to the next connection at once."""

from __future__ import annotations

import zmq

from megatron_coord.coordinator.liveness import PeerMonitor


def _connect_and_send(context: zmq.Context, address: str, identity: bytes) -> zmq.Socket:
    peer = context.socket(zmq.DEALER)
    peer.setsockopt(zmq.IDENTITY, identity)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(address)
    peer.send(b"x")
    return peer


def _recv_fd(router: zmq.Socket) -> tuple[bytes, int]:
    assert router.poll(5000)
    identity, frame = router.recv_multipart(copy=False)
    return identity.bytes, frame.get(zmq.SRCFD)


def _reused_descriptor(context, router, monitor, address) -> tuple[zmq.Socket, int]:
    """A stranger connects and closes (its close event queued, not read), then the engine
    connects on the stranger's old descriptor. The kernel gives the lowest free descriptor, so
    that is the usual case, but another thread of this process may open a file in between: then
    both were strangers (no event names anybody), and the pair is tried again."""
    for attempt in range(20):
        stranger = _connect_and_send(context, address, b"stranger-%d" % attempt)
        _, stranger_fd = _recv_fd(router)  # never learned: it never registered
        stranger.close(0)
        assert monitor.socket.poll(5000)  # its close event is queued, not yet read
        engine = _connect_and_send(context, address, b"engine")
        identity, engine_fd = _recv_fd(router)
        assert identity == b"engine"
        if engine_fd == stranger_fd:
            return engine, engine_fd
        engine.close(0)
        assert monitor.socket.poll(5000)
        assert monitor.disconnected() == []  # strangers' events name nobody
    raise AssertionError("the kernel never reused the stranger's descriptor in 20 tries")


def test_a_strangers_close_event_is_not_blamed_on_the_peer_that_reuses_its_descriptor():
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    monitor = PeerMonitor(router, heartbeat_timeout_s=3.0)
    engine = None
    try:
        engine, engine_fd = _reused_descriptor(context, router, monitor, address)
        monitor.learn(b"engine", engine_fd)
        assert monitor.disconnected() == []  # the stranger's event named nobody we know
        engine.close(0)
        assert monitor.socket.poll(5000)
        assert monitor.disconnected() == [b"engine"]
        assert monitor.sizes == {"peer_fds": 0}
    finally:
        if engine is not None:
            engine.close(0)
        monitor.close()
        router.close(0)
        context.term()
