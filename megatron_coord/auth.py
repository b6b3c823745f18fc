"""Authentication of clients and engines: ZMQ CURVE through pyzmq's ``zmq.auth``.

A key directory (``python -m megatron_coord.auth generate DIR``) holds:

* ``server.key`` / ``server.key_secret``: the coordinator's key pair (clients and engines need
  only ``server.key``, the public half, to know they talk to the right coordinator);
* ``client.key`` / ``client.key_secret``: a key pair for clients and engines;
* ``authorized/``: the public keys the coordinator accepts (``client.key`` is placed there;
  ``generate DIR --name NAME`` adds another client key pair and authorizes it).

The coordinator (``auth_keys=DIR``) runs a ``ThreadAuthenticator`` that allows exactly the
public keys in ``DIR/authorized``; a peer without a key, or with an unknown one, fails the CURVE
handshake and never gets a single frame through. Traffic is encrypted as well.

Binding anything but loopback without keys is refused unless the user opts out loudly
(``insecure_no_auth``); see ``check_bind``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger("megatron_coord.auth")

AUTHORIZED = "authorized"
_LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    return host.startswith(_LOOPBACK)


def check_bind(host: str, auth_keys: str | None, insecure_no_auth: bool) -> None:
    """Refuse a non-loopback bind without authentication unless explicitly opted out."""
    if is_loopback(host) or auth_keys is not None:
        return
    if not insecure_no_auth:
        raise ValueError(
            f"binding {host!r} exposes the coordinator beyond this machine: pass auth_keys "
            "(--auth-keys DIR, made by `python -m megatron_coord.auth generate DIR`) or opt out "
            "with insecure_no_auth (--insecure-no-auth)"
        )
    logger.warning(
        "SECURITY WARNING: the coordinator binds %s WITHOUT authentication: anyone who can "
        "reach this port can submit work, read results and stop the engines",
        host,
    )


def generate(directory: str, name: str = "client") -> tuple[str, str]:
    """Create the server key pair (once) and a client key pair ``name``; authorize the client.

    Returns the paths of the server public key and the client secret key file."""
    os.makedirs(directory, exist_ok=True)
    authorized = os.path.join(directory, AUTHORIZED)
    os.makedirs(authorized, exist_ok=True)
    server_public = os.path.join(directory, "server.key")
    old_umask = os.umask(0o077)  # secret keys are never readable by others, not even briefly
    try:
        if not os.path.exists(server_public):
            zmq.auth.create_certificates(directory, "server")
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    for public_key in (server_public, public):
        os.chmod(public_key, 0o644)
    shutil.copy(public, os.path.join(authorized, os.path.basename(public)))
    return server_public, secret


class ServerAuth:
    """CURVE server side: the authenticator thread and the ROUTER's key pair."""

    def __init__(self, context: zmq.Context, directory: str) -> None:
        secret_file = os.path.join(directory, "server.key_secret")
        authorized = os.path.join(directory, AUTHORIZED)
        if not os.path.isfile(secret_file) or not os.path.isdir(authorized):
            raise FileNotFoundError(
                f"{directory} is not a key directory (no server.key_secret or {AUTHORIZED}/); "
                "make one with `python -m megatron_coord.auth generate DIR`"
            )
        self.public, self.secret = zmq.auth.load_certificate(secret_file)
        self.authenticator = ThreadAuthenticator(context)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=authorized)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before bind) a CURVE server with this key pair."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self.authenticator.stop()


def apply_client(sock: zmq.Socket, directory: str, name: str = "client") -> None:
    """Make ``sock`` (before connect) a CURVE client with key pair ``name`` of ``directory``."""
    public, secret = zmq.auth.load_certificate(os.path.join(directory, f"{name}.key_secret"))
    server_public, _ = zmq.auth.load_certificate(os.path.join(directory, "server.key"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="megatron_coord CURVE keys")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="create DIR with server and client key pairs")
    gen.add_argument("directory")
    gen.add_argument("--name", default="client", help="client key pair name (default client)")
    args = parser.parse_args(argv)
    server_public, secret = generate(args.directory, args.name)
    print(f"server public key: {server_public}\nclient secret key: {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
