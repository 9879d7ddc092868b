"""Workers on separate hosts, for real: two worker processes, each in its own network namespace,
reach Redis and PostgreSQL only over their own veth link to the host, and score one file.

Needs root and ``ip`` (iproute2), and ``redis-server``; the host's own Redis and PostgreSQL listen
on 127.0.0.1, which a namespace cannot reach, so the test runs a Redis of its own on the links'
host addresses and relays PostgreSQL to them. See also the process-only fallback,
``test_score_e2e.py::test_workers_as_separate_hosts_over_tcp``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import make_url, select

from tests.conftest import (
    POSTGRES_URL,
    REDIS_URL,
    WorkerProcess,
    postgres_database,
    stop_workers,
    unavailable,
)
from tests.test_score_e2e import score_together
from tuneq.schemas.tables import Shard
from tuneq.worker.store.db import get_engine


@dataclass(frozen=True)
class Namespace:
    """A network namespace joined to the root namespace by a veth pair on a /30 of its own."""

    name: str
    host_link: str  # the pair's end in the root namespace
    host_address: str  # its address: the one host address the namespace can reach

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


@dataclass
class Hosts:
    """Namespaces with a Redis and a PostgreSQL relay on their links; the workers started in
    them. ``envs[i]`` are the settings for a worker in ``namespaces[i]``."""

    namespaces: list[Namespace]
    envs: list[dict[str, str]]
    client: dict[str, str]
    redis_port: int
    postgres: tuple[str, int]  # the server the links relay to
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, env: dict[str, str], queue: str) -> WorkerProcess:
        """Start a worker with ``env`` in the namespace those settings belong to."""
        namespace = self.namespaces[self.envs.index(env)]
        log = self.log_dir / f"worker-{namespace.name}.log"
        worker = WorkerProcess(env, queue, log, prefix=namespace.exec_prefix)
        self.workers.append(worker)
        worker.wait_ready()
        return worker


def ip(*args: str) -> None:
    """Run ``ip ARGS``; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def free_subnets(count: int) -> list[int]:
    """``count`` random third octets X with no address in 10.231.X.0/24 on this machine, so runs
    side by side do not route each other's links."""
    listing = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    used = {int(octet) for octet in re.findall(r"\b10\.231\.(\d+)\.", listing)}
    return random.sample(sorted(set(range(256)) - used), count)


@contextmanager
def linked_namespace(name: str, suffix: str, octet: int) -> Iterator[Namespace]:
    """Namespace ``name`` with loopback up and a veth pair to the root namespace on
    10.231.OCTET.0/30 (host .1, namespace .2); removed at exit, with any process left in it."""
    # Interface names are at most 15 characters.
    host_link, inner_link = f"tqh{suffix}{name[-1]}", f"tqn{suffix}{name[-1]}"
    host_address = f"10.231.{octet}.1"
    ip("netns", "add", name)
    try:
        ip("link", "add", host_link, "type", "veth", "peer", "name", inner_link, "netns", name)
        ip("addr", "add", f"{host_address}/30", "dev", host_link)
        ip("link", "set", host_link, "up")
        ip("-n", name, "addr", "add", f"10.231.{octet}.2/30", "dev", inner_link)
        ip("-n", name, "link", "set", inner_link, "up")
        ip("-n", name, "link", "set", "lo", "up")
        yield Namespace(name, host_link, host_address)
    finally:
        kill_processes_in(name)
        # Deleting one end deletes the pair; done explicitly in case the namespace outlives us.
        subprocess.run(["ip", "link", "del", host_link], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def kill_processes_in(namespace: str) -> None:
    """Kill what is still running in ``namespace``: only this test starts processes there."""
    listing = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    for pid in listing.stdout.split():
        with suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


@contextmanager
def private_redis(addresses: list[str], folder: Path) -> Iterator[int]:
    """A throwaway ``redis-server`` listening on ``addresses`` only; yields its port."""
    port = free_port(addresses[0])
    log = folder / "redis.log"
    command = ["redis-server", "--bind", *addresses, "--port", str(port), "--save", ""]
    # Protected mode refuses every client not on loopback; these links are the test's own.
    command += ["--protected-mode", "no", "--appendonly", "no", "--dir", str(folder)]
    process = subprocess.Popen([*command, "--logfile", str(log)])
    try:
        wait_for_redis(addresses[0], port, process, log)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_redis(address: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import redis

    client = redis.Redis(host=address, port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.RedisError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not ready: {exc}\n{log.read_text()}") from exc
        time.sleep(0.1)


class Relay(socketserver.BaseRequestHandler):
    """Copies one connection to ``server.target`` and back, until either side closes."""

    server: RelayServer

    def handle(self) -> None:
        with socket.create_connection(self.server.target) as upstream:
            back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
            back.start()
            pump(self.request, upstream)
            back.join()


class RelayServer(socketserver.ThreadingTCPServer):
    # A connection still open at exit must not block the shutdown; its thread dies with us.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        super().__init__(address, Relay)


def pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until end of stream, then pass the end on."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        # The other direction failed first: closing both sockets ends this copy too.
        for end in (source, sink):
            end.close()


@contextmanager
def tcp_relay(address: str, target: tuple[str, int]) -> Iterator[int]:
    """Relay connections to a free port on ``address`` to ``target``; yields the port."""
    server = RelayServer((address, 0), target)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def can_connect(address: str, port: int, namespace: Namespace | None = None) -> bool:
    """Whether a TCP connection to ``address:port`` opens from ``namespace`` (default: here)."""
    code = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)"
    prefix = namespace.exec_prefix if namespace else []
    probe = [*prefix, sys.executable, "-c", code, address, str(port)]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from postgres_database(POSTGRES_URL)


@pytest.fixture
def hosts(
    postgres_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hosts]:
    """Two namespaces ``a`` and ``b`` whose workers share a Redis and PostgreSQL over their links
    and one artifact folder (what NFS would provide); the client is the host itself, the root
    namespace. All torn down at the end: workers first, while their namespaces still exist."""
    if shutil.which("ip") is None or shutil.which("redis-server") is None:
        unavailable("network namespaces need `ip` (iproute2) and `redis-server`")
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    suffix = uuid.uuid4().hex[:6]
    database = make_url(postgres_url)
    postgres = (database.host or "127.0.0.1", database.port or 5432)
    with ExitStack() as stack:
        namespaces = []
        for letter, octet in zip("ab", free_subnets(2), strict=True):
            try:
                namespace = stack.enter_context(
                    linked_namespace(f"tq-{suffix}-{letter}", suffix, octet)
                )
            except RuntimeError as exc:
                unavailable(f"cannot create a network namespace: {exc}")
            namespaces.append(namespace)
        addresses = [namespace.host_address for namespace in namespaces]
        redis_port = stack.enter_context(private_redis(addresses, tmp_path))
        shared = {
            "TUNEQ_ARTIFACT_DIR": str(tmp_path / "nfs" / "artifacts"),
            "TUNEQ_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
        }
        envs = []
        for letter, address in zip("ab", addresses, strict=True):
            relay_port = stack.enter_context(tcp_relay(address, postgres))
            relayed = database.set(host=address, port=relay_port)
            envs.append(
                {
                    **shared,
                    "TUNEQ_BROKER_URL": f"redis://{address}:{redis_port}/0",
                    "TUNEQ_DATABASE_URL": relayed.render_as_string(hide_password=False),
                    "TUNEQ_DATA_DIR": str(tmp_path / letter),
                }
            )
        client = {
            **shared,
            "TUNEQ_BROKER_URL": f"redis://{addresses[0]}:{redis_port}/0",
            "TUNEQ_DATABASE_URL": postgres_url,
            "TUNEQ_DATA_DIR": str(tmp_path / "client"),
        }
        setup = Hosts(namespaces, envs, client, redis_port, postgres, tmp_path)
        stack.callback(stop_workers, setup.workers)
        yield setup


def test_workers_in_network_namespaces_score_one_file(
    hosts: Hosts, postgres_url: str, trained_tiny_model: Path, tmp_path: Path
):
    """Each namespace reaches the services only through its own link, not the host's loopback
    and not the other link; its worker scores shards of one file submitted from the host."""
    system_redis = urlsplit(REDIS_URL)
    host_only = [hosts.postgres, (system_redis.hostname or "127.0.0.1", system_redis.port or 6379)]
    host_only = [service for service in host_only if can_connect(*service)]
    assert hosts.postgres in host_only, "PostgreSQL answers on the host"
    for namespace, other in zip(hosts.namespaces, reversed(hosts.namespaces), strict=True):
        assert can_connect(namespace.host_address, hosts.redis_port, namespace)
        assert not can_connect(other.host_address, hosts.redis_port, namespace)
        for address, port in host_only:
            assert not can_connect(address, port, namespace), f"{address}:{port} is isolated"

    score_together(hosts.client, hosts.envs, hosts.start_worker, trained_tiny_model, tmp_path)

    for worker, namespace in zip(hosts.workers, hosts.namespaces, strict=True):
        inside = os.stat(f"/proc/{worker.process.pid}/ns/net").st_ino
        assert inside == os.stat(f"/run/netns/{namespace.name}").st_ino, "worker in its namespace"
    with get_engine(postgres_url).connect() as conn:
        names = conn.scalars(select(Shard.worker).distinct()).all()
    # Shards name the pool process that ran them: host:WORKER-PID/PID.
    worker_pids = {name.rsplit(":", 1)[1].split("/")[0] for name in names if name}
    assert worker_pids == {str(worker.process.pid) for worker in hosts.workers}
    for env in [*hosts.envs, hosts.client]:
        assert not (Path(env["TUNEQ_DATA_DIR"]) / "tuneq.db").exists(), "no local database"
