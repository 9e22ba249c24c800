"""GPU claiming on a local multi-GPU machine: each process holds its own GPU while it runs."""

import subprocess
import sys

from conftest import ROOT

from ltbench.training import gpus

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from ltbench.training import gpus
print(gpus.claim({n}, {d!r}), flush=True)
time.sleep(60)
"""


def holder(n, d):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(root=str(ROOT), n=n, d=str(d))], stdout=subprocess.PIPE, text=True
    )
    return p, int(p.stdout.readline())


def test_jobs_spread_over_the_gpus_then_share_and_a_finished_job_frees_its_gpu(tmp_path):
    procs = []
    try:
        got = []
        for _ in range(3):
            p, gpu = holder(2, tmp_path)
            procs.append(p)
            got.append(gpu)
        assert got == [0, 1, 0]  # one per GPU first, then a second job on GPU 0
        procs[1].kill()
        procs[1].wait()
        p, gpu = holder(2, tmp_path)  # GPU 1 is free again (the kernel released the dead job's lock)
        procs.append(p)
        assert gpu == 1
        assert gpus.claim(2, tmp_path) == 1  # this process: the next free slot (GPU 1, second slot)
    finally:
        for p in procs:
            p.kill()
            p.wait()
