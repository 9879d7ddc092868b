"""The allocator setting of worker processes, in fresh processes (it is process-wide): freed
tensors are reused without new page faults, and what is free goes back after a job."""

import json
import os
import subprocess
import sys

import pytest

from tuneq.worker.ml.allocator import glibc

pytestmark = pytest.mark.skipif(glibc() is None, reason="the setting is glibc's; no glibc here")

# A training step's pattern: tensors larger than glibc's default mmap threshold can grow to
# (32 MiB), made and freed again and again; then many 1 MiB tensors (under any threshold)
# freed together, as a job's model and activations are at its end.
CHILD = """
import json, resource, statistics, sys
import torch
from tuneq.worker.ml.allocator import keep_freed_memory, return_freed_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def resident_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20

def step():
    gradient = torch.ones(48 << 20 >> 2)  # 48 MiB, as MiniLM's embedding gradient
    del gradient

kept = keep_freed_memory()
step()  # the first step faults its pages in (and starts torch's threads) either way
step_faults = []
for _ in range(21):
    before = faults()
    step()
    step_faults.append(faults() - before)
blocks = [torch.ones(1 << 18) for _ in range(300)]  # 300 MiB of 1 MiB tensors
del blocks
held = resident_mb()
return_freed_memory()
print(json.dumps({"kept": kept, "median_step_faults": statistics.median(step_faults),
                  "held_mb": held, "after_trim_mb": resident_mb()}))
"""


def run_child(keep: str) -> dict:
    env = {**os.environ, "TUNEQ_KEEP_FREED_MEMORY": keep}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_freed_memory_is_reused_by_the_next_step_and_given_back_after_the_job() -> None:
    kept, default = run_child("true"), run_child("false")
    assert kept["kept"] and not default["kept"]
    # the median step's page faults: glibc's default maps each 48 MiB tensor afresh, 12,288
    # pages faulted in every step
    assert default["median_step_faults"] >= 12_288
    # kept, a step reuses the pages of the one before. Not every step: now and then a step
    # faults a whole tensor in again (likely a small allocation splitting the freed block, so
    # that the next tensor extends the heap; 2 to 6 of 20 steps on these VMs, 24,576-73,728
    # faults in all against 245,780), so the median step is the measure, not the total
    assert kept["median_step_faults"] < 1_000
    # the 300 MiB freed stay in the process until the job ends, then go back
    assert kept["held_mb"] - kept["after_trim_mb"] > 250
