"""glibc malloc tuning for training processes (winattn.train.allocator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from winattn.cli.main import build_parser
from winattn.train import allocator
from winattn.train.allocator import tune_malloc


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_sets_both_thresholds():
    libc = FakeLibc()
    assert tune_malloc({}, libc=libc) == "tuned"
    assert libc.calls == [
        (allocator.M_MMAP_THRESHOLD, 32 * 1024 * 1024),
        (allocator.M_TRIM_THRESHOLD, 2**31 - 1),
    ]


@pytest.mark.parametrize("name", allocator.USER_SETTINGS)
def test_leaves_the_users_settings_alone(name):
    libc = FakeLibc()
    assert tune_malloc({name: "65536"}, libc=libc) == f"{name} is set"
    assert libc.calls == []


def test_leaves_a_preloaded_allocator_alone():
    libc = FakeLibc()
    done = tune_malloc({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, libc=libc)
    assert done == "jemalloc is preloaded"
    assert libc.calls == []


def test_reports_a_refusal():
    assert tune_malloc({}, libc=FakeLibc(result=0)) == "mallopt refused"


def test_train_and_demo_take_the_flag():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "swin_demo_patch2_window4_16"])
    assert args.malloc_tuning is True
    args = parser.parse_args(["demo", "--no-malloc-tuning"])
    assert args.malloc_tuning is False


# Three 24 MiB tensors allocated, written and freed, ten times over. With glibc's defaults the
# freed 72 MiB at the top of the heap can exceed the trim threshold (at most 64 MiB however the
# thresholds have moved) and go back to the kernel, so rounds fault their pages in again;
# tuned, the heap keeps them.
_FAULTS = textwrap.dedent("""
    import json, resource, sys
    import torch
    from winattn.train.allocator import tune_malloc
    done = tune_malloc() if sys.argv[1] == "tuned" else "default"
    def round_trip():
        held = [torch.ones(6 * 2**20) for _ in range(3)]  # 3 x 24 MiB, written
        del held
    round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        round_trip()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"done": done, "faults": faults}))
""")


@pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc")
def test_tuned_process_reuses_freed_memory():
    def faults(variant: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", _FAULTS, variant], capture_output=True,
                             text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    default, tuned = faults("default"), faults("tuned")
    round_pages = 72 * 2**20 // 4096  # what one round on fresh pages faults
    assert tuned["done"] == "tuned"
    assert tuned["faults"] < round_pages  # ten rounds, less than one round's pages
    # glibc's own heuristics decide how often the defaults trim (every round in most runs,
    # some runs fewer), but they do, so the pattern tells the two apart.
    assert default["faults"] > tuned["faults"] + round_pages // 2
