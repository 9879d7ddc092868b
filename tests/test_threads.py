"""Torch threads per host: worker processes on one machine split its cores between them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import invoke_cli, queue_name, score_args, scoring_input
from tuneq.worker.ml.threads import host_cores, host_processes, host_share


def test_shares_add_up_to_the_cores() -> None:
    for cores in range(1, 17):
        for count in range(1, 6):
            pids = [100 + 7 * i for i in range(count)]
            shares = [host_share(pid, pids, cores) for pid in pids]
            assert sum(shares) == max(cores, count), (cores, shares)  # at least 1 thread each
            assert max(shares) - min(shares) <= 1


def test_the_registry_counts_live_processes_only(tmp_path: Path) -> None:
    join = "from tuneq.worker.ml.threads import join_host; import sys, time; "
    join += f"join_host(__import__('pathlib').Path({str(tmp_path)!r})); print('in', flush=True); "
    join += "time.sleep(60)"
    children = [
        subprocess.Popen([sys.executable, "-c", join], stdout=subprocess.PIPE) for _ in range(3)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == b"in\n"
        assert host_processes(tmp_path) == sorted(c.pid for c in children)
        children[1].kill()
        children[1].wait()
        assert host_processes(tmp_path) == sorted([children[0].pid, children[2].pid])
        assert not (tmp_path / str(children[1].pid)).exists(), "a dead process's file goes"
        (tmp_path / str(children[0].pid)).write_text("1")  # its pid, reused by another process
        assert host_processes(tmp_path) == [children[2].pid]
    finally:
        for child in children:
            child.kill()
            child.wait()


def last_threads(worker, timeout_s: float = 60) -> tuple[int, int]:
    """The last thread count a worker's pool process set, and how many processes shared
    (waiting for the first: a pool process starts after its worker says it is ready)."""
    deadline = time.monotonic() + timeout_s
    pattern = r"torch threads: (\d+) \((\d+) worker processes share"
    while not (found := re.findall(pattern, worker.log.read_text())):
        assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
        time.sleep(0.2)
    return int(found[-1][0]), int(found[-1][1])


def test_two_workers_on_one_host_split_its_cores(
    env: dict[str, str], start_worker, trained_tiny_model: Path, tmp_path: Path
) -> None:
    # A registry of this test's own; heartbeats every second, so the rows follow quickly.
    host = {**env, "TMPDIR": str(tmp_path / "host"), "TUNEQ_REAP_INTERVAL_S": "1"}
    (tmp_path / "host").mkdir()
    queue = queue_name()
    first = start_worker(host, queue)
    assert last_threads(first) == (host_cores(), 1), "alone, it takes them all"
    second = start_worker(host, queue)
    last_threads(second)  # both pool processes are in the registry
    source = scoring_input(tmp_path / "in.csv", 3000)
    result = invoke_cli(
        host,
        *score_args(trained_tiny_model, source, tmp_path / "out.csv", queue),
        "--shard-rows",
        "100",
        "--wait",
    )
    assert result.exit_code == 0, result.output

    deadline = time.monotonic() + 30
    while True:  # each refits before its next shard; both took shards of 30
        shares = [last_threads(w) for w in (first, second)]
        if all(count == 2 for _, count in shares) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [count for _, count in shares] == [2, 2], shares
    assert sum(threads for threads, _ in shares) == max(host_cores(), 2), shares
    # `tuneq workers` shows the share each has now, not the whole machine it had alone.
    rows = json.loads(invoke_cli(host, "workers", "--json").stdout)
    assert [row["threads"] for row in rows] == [max(1, host_cores() // 2)] * 2, rows
