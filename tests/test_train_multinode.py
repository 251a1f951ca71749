"""fastgrpo's trainer on two "nodes": two ``torchrun`` launches on this machine (``--nnodes 2``,
one process each, a static rendezvous on the loopback address, gloo), the way a 2-machine job
starts; the run equals the 1-process run on the same global batch (the harness and the checks
of ``test_train_distributed.py``: seeded per-prompt sampling, same metrics, same weights)."""

from __future__ import annotations

import os
import subprocess
import sys

from test_train_distributed import ARGS, REPO, RUNNER, _free_port, _run, assert_same_run


def test_two_nodes_equal_one_process(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(runner), *ARGS, "--out-dir", str(one)])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(runner), *ARGS, "--out-dir", str(two), "--dp-strategy", "ddp"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    assert outs[0][0].count("held-out greedy") == 1 and "held-out greedy" not in outs[1][0]
    assert_same_run(one, two)
