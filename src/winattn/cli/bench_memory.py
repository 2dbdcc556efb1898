"""Memory in fresh subprocesses for ``winattn bench``: one configuration (one library's model,
inference features or training steps) per process, its peak resident set measured after the
building's peak is reset.

Run as a module (``python -m winattn.cli.bench_memory --worker JSON``) it is the worker:
one configuration in a fresh process, printing its peak RSS as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

import winattn
from winattn.cli import bench_cases


def run_worker(spec: dict) -> dict:
    """In a fresh process: build one peer, run the configuration, report RSS (MiB).

    ``build_peers`` builds winattn and timm both (winattn takes timm's weights); the one not
    measured is dropped and the peak RSS reset (:func:`reset_peak_rss`) before the baseline,
    so that the peak is the run's and not the building's. Where the reset is unavailable, the
    peak counts only if the run raised it above everything before; otherwise the figures are
    None with ``not_measured`` saying why."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    peers, _ = bench_cases.build_peers(
        spec["variant"], [spec["peer"]], img_size=spec.get("img_size")
    )
    peer = peers.pop(spec["peer"])
    del peers
    res = spec.get("resolution", bench_cases.image_size(spec["variant"]))
    x = torch.randn(spec["batch"], 3, res, res)
    if spec["mode"] == "train":
        target = torch.randint(0, 1000, (spec["batch"],))
        step = bench_cases.train_step_fn(peer, x, target, spec["dtype"])

        def run() -> None:
            for _ in range(spec.get("steps", 2)):
                step()
    else:
        def run() -> None:
            with torch.no_grad(), bench_cases.autocast_context(spec["dtype"]):
                for _ in range(spec.get("steps", 1)):
                    peer.features(x)

    return measure_peak(run)


def measure_peak(run: Callable[[], object]) -> dict:
    """Peak RSS of ``run()`` in this process, in MiB: the baseline RSS before it, the peak
    (VmHWM) and their difference. Drops what the garbage collector can and resets the
    high-water mark first (:func:`reset_peak_rss`), so that what was built and freed before
    (a second model) does not stand in for the run's peak. Where the reset is unavailable the
    peak counts only if ``run()`` raised it; else the figures are None, ``not_measured`` says
    why."""
    gc.collect()
    reset = reset_peak_rss()
    base = _rss_mib()
    before = _peak_rss_mib()
    run()
    peak = _peak_rss_mib()
    result = {"baseline_rss_mib": base, "peak_rss_mib": peak,
              "peak_over_baseline_mib": peak - base, "peak_reset": reset}
    if not reset and peak <= before:
        result.update(peak_rss_mib=None, peak_over_baseline_mib=None, not_measured=(
            "the peak RSS could not be reset and the run did not exceed the peak reached "
            "while building the models"))
    return result


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (``echo 5 > /proc/self/clear_refs``,
    Linux) and check that it took: False where the file is missing or the peak stayed up."""
    rss = _rss_mib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    # VmHWM is now the RSS at the reset; allow for what the interpreter touched since.
    return _peak_rss_mib() <= max(rss, _rss_mib()) + 4.0


def _peak_rss_mib() -> float:
    """VmHWM: the peak RSS of this process image (since the last :func:`reset_peak_rss`).
    (``ru_maxrss`` would not do: Linux carries it across ``execve`` from the forking parent,
    so a child of a large parent inherits its peak, and nothing resets it.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(spec: dict) -> dict:
    """Run :func:`run_worker` in a fresh interpreter. Large blocks go through mmap
    (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed memory leaves the RSS at once and the
    peak is the peak of live memory. The worker runs on this process's torch thread count
    unless ``spec["threads"]`` says otherwise."""
    spec = {"threads": torch.get_num_threads(), **spec}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    src = str(Path(winattn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "winattn.cli.bench_memory", "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", required=True, help="JSON spec of one memory measurement")
    print(json.dumps(run_worker(json.loads(parser.parse_args().worker))))
