"""hero_train.allocator: glibc keeps freed activation blocks, so steps stop page-faulting them in."""

import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# Allocate and free 40 blocks of 8 MiB, as a training step does with its activations, and print the
# minor page faults per cycle after a first cycle.
CYCLES = """
import resource, sys, torch
from hero_train.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    print(keep_freed_memory())
elif sys.argv[1] in ("library", "optimizer"):  # a user's own loop, with and without asking
    from hero_train.optim import HERO
    if sys.argv[1] == "library":
        keep_freed_memory()
    HERO(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    print(True)
else:
    print(False)
def cycle():
    blocks = [torch.ones(2**21) for _ in range(40)]
    del blocks
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def faults(mode, **env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return out[0] == "True", float(out[1])


@glibc
def test_kept_blocks_are_not_faulted_in_again():
    took, kept = faults("kept")
    _, default = faults("default")
    assert took
    # 40 x 8 MiB is 81,920 pages: glibc's defaults fault most of them in on every cycle.
    assert default > 20_000 and kept < default / 3, (kept, default)


@glibc
def test_the_users_malloc_settings_win():
    took, _ = faults("kept", MALLOC_TRIM_THRESHOLD_="131072")
    assert not took


@glibc
def test_a_loop_of_your_own_keeps_freed_blocks_when_it_asks():
    _, library = faults("library")
    _, default = faults("default")
    _, opted_out = faults("library", HERO_KEEP_FREED_MEMORY="0")
    assert library < default / 3 and opted_out > default / 2, (library, default, opted_out)


@glibc
def test_building_an_optimizer_leaves_the_process_malloc_settings_alone():
    _, optimizer = faults("optimizer")
    _, default = faults("default")
    assert optimizer > default / 2, (optimizer, default)
