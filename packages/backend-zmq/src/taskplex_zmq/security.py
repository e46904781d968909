"""Secure by default: loopback only, unless CurveZMQ keys authenticate every peer.

Whoever can send a worker host a task runs code there, and whoever poses as the broker can send a
client pickles; so the broker, its worker hosts and its clients all refuse a network address
other than loopback without keys, with a message that says how to make them::

    taskplex zmq keygen KEYS        # KEYS/broker.key[_secret], KEYS/peer.key[_secret], KEYS/authorized/

Give the directory (or a copy without ``broker.key_secret``) to clients and worker hosts:
``--keys KEYS`` on the command line, ``keys="KEYS"`` as the client option. The broker accepts
only peers whose public key is in ``KEYS/authorized`` (CurveZMQ with a ZAP handler): the
handshake of any other peer fails inside ZeroMQ, before a single frame of it reaches the broker
(which, besides, never unpickles anything). ``insecure=True`` / ``--insecure`` is the explicit
opt-out for trusted networks.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from pathlib import Path
from typing import Any

import zmq

__all__ = [
    "InsecureAddress",
    "KeyDirectory",
    "check_address",
    "generate_keys",
    "is_loopback",
]

KEYGEN_HINT = (
    "make keys with `taskplex zmq keygen DIRECTORY` and pass them to the broker and worker hosts "
    "(--keys DIRECTORY) and to clients (keys='DIRECTORY'), or opt out explicitly with --insecure "
    "(insecure=True) on a network you trust"
)


class InsecureAddress(ValueError):
    """A network address without keys (and without the explicit opt-out)."""


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this machine only (loopback, ipc, inproc)."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if ";" in host:  # tcp://source;destination: what is reached is the destination
        host = host.rpartition(";")[2]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a wildcard, an interface name or a host name: possibly the network


def check_address(endpoint: str, keys: str | os.PathLike[str] | None, insecure: bool, role: str) -> None:
    """Refuse a non-loopback ``endpoint`` without keys, unless ``insecure``."""
    if keys is None and not insecure and not is_loopback(endpoint):
        raise InsecureAddress(
            f"refusing to {role} {endpoint} without CurveZMQ keys: anyone who can reach it could "
            f"run code on the worker hosts; {KEYGEN_HINT}"
        )


class KeyDirectory:
    """The key files of :func:`generate_keys` in ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not (self.path / "broker.key").is_file():
            raise FileNotFoundError(f"{self.path} holds no broker.key: {KEYGEN_HINT}")

    def _load(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        import zmq.auth

        suffix = ".key_secret" if secret else ".key"
        public, private = zmq.auth.load_certificate(str(self.path / f"{name}{suffix}"))
        return public, private

    def configure_broker(self, socket: zmq.Socket[Any]) -> Any:
        """Make ``socket`` a CURVE server admitting the authorized keys; returns the authenticator
        (stop it after closing the socket)."""
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = self._load("broker", secret=True)
        authenticator = ThreadAuthenticator(socket.context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(self.path / "authorized"))
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True
        return authenticator

    def configure_peer(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` a CURVE client of the broker with the peer key."""
        broker, _ = self._load("broker", secret=False)
        public, secret = self._load("peer", secret=True)
        socket.curve_serverkey = broker
        socket.curve_publickey = public
        socket.curve_secretkey = secret


def generate_keys(directory: str | os.PathLike[str]) -> Path:
    """Create a broker key pair, a peer key pair and ``authorized/`` admitting the peer key."""
    import zmq.auth

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "broker.key").exists():
        raise FileExistsError(f"{path} already holds keys; remove them first or use another directory")
    os.chmod(path, 0o700)
    zmq.auth.create_certificates(str(path), "broker")
    zmq.auth.create_certificates(str(path), "peer")
    authorized = path / "authorized"
    authorized.mkdir(exist_ok=True)
    shutil.copy(path / "peer.key", authorized / "peer.key")
    for secret in path.glob("*.key_secret"):
        os.chmod(secret, 0o600)
    return path
