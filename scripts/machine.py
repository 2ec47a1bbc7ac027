"""Changes the benchmark harnesses make to the machine -- zram and file
swap, memory cgroups, scratch directories -- each logged to a state file
before it is made and undone in reverse order, also by the next run when
a run was killed. Used by scripts/swapbench and scripts/compat."""

import json
import os
import signal
import subprocess
import sys
import time

CGROUP_ROOT = "/sys/fs/cgroup/memory"


class Machine:
    """Changes to the machine, each recorded (in the state file) before it is made
    and undone in reverse order by `restore`."""

    def __init__(self, state, prefix):
        self.state, self.prefix = state, prefix
        self.undo = []

    def _save(self):
        with open(self.state + ".tmp", "w") as f:
            json.dump(self.undo, f)
        os.replace(self.state + ".tmp", self.state)

    def push(self, action):
        self.undo.append(action)
        self._save()

    @staticmethod
    def _undo_one(action):
        kind, arg = action
        if kind == "swapoff":
            if any(line.split()[0] == arg for line in open("/proc/swaps").readlines()[1:]):
                subprocess.run(["swapoff", arg], check=True)
        elif kind == "rmtree":
            subprocess.run(["rm", "-rf", "--one-file-system", arg], check=True)
        elif kind == "unlink":
            if os.path.exists(arg):
                os.unlink(arg)
        elif kind == "zram_reset":
            path = f"/sys/block/{arg}/reset"
            if os.path.exists(path):
                write(path, "1")
        elif kind == "zram_remove":
            if os.path.exists(f"/sys/block/{arg}"):
                write("/sys/class/zram-control/hot_remove", arg.removeprefix("zram"))
        elif kind == "rmcgroup":
            if os.path.isdir(arg):
                for _ in range(50):
                    pids = open(os.path.join(arg, "cgroup.procs")).read().split()
                    for pid in pids:
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    try:
                        os.rmdir(arg)
                        break
                    except OSError:
                        time.sleep(0.1)
                else:
                    raise RuntimeError(f"cgroup {arg} still busy")

    def restore(self):
        failed = False
        while self.undo:
            action = self.undo[-1]
            try:
                self._undo_one(action)
            except Exception as e:  # keep undoing the rest
                print(f"{self.prefix}: could not undo {action}: {e}", file=sys.stderr)
                failed = True
            self.undo.pop()
            self._save()
        if not failed and os.path.exists(self.state):
            os.unlink(self.state)
        return not failed

    def recover(self):
        """Undoes what a killed earlier run left behind."""
        if os.path.exists(self.state):
            try:
                self.undo = [tuple(a) for a in json.load(open(self.state))]
            except ValueError:
                self.undo = []
            if self.undo:
                print(f"{self.prefix}: undoing {len(self.undo)} change(s) left by an earlier run")
            self.restore()

    def zram_swap(self, size):
        """Swap on a zram device of `size` bytes; returns its path."""
        dev = None
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("zram") and read(f"/sys/block/{name}/disksize") == "0":
                dev = name
                break
        if dev is None:
            if not os.path.exists("/sys/class/zram-control/hot_add"):
                raise Unavailable("no free zram device (is the zram module loaded?)")
            # Reading hot_add creates a device and returns its number.
            dev = "zram" + read("/sys/class/zram-control/hot_add")
            self.push(("zram_remove", dev))
        algos = read(f"/sys/block/{dev}/comp_algorithm")
        self.push(("zram_reset", dev))
        if "lz4" in algos.replace("[", " ").replace("]", " ").split():
            write(f"/sys/block/{dev}/comp_algorithm", "lz4")
        write(f"/sys/block/{dev}/disksize", str(size))
        path = f"/dev/{dev}"
        subprocess.run(["mkswap", path], check=True, stdout=subprocess.DEVNULL)
        self.push(("swapoff", path))
        subprocess.run(["swapon", "-p", "32767", path], check=True)
        return path

    def file_swap(self, size, directory="/var/tmp"):
        path = os.path.join(directory, f"lego-{self.prefix}-{os.getpid()}.swap")
        self.push(("unlink", path))
        subprocess.run(["fallocate", "-l", str(size), path], check=True)
        os.chmod(path, 0o600)
        subprocess.run(["mkswap", path], check=True, stdout=subprocess.DEVNULL)
        self.push(("swapoff", path))
        subprocess.run(["swapon", "-p", "32767", path], check=True)
        return path

    def cgroup(self, name, limit):
        """A memory cgroup limited to `limit` bytes (None: no limit)."""
        if not os.path.exists(os.path.join(CGROUP_ROOT, "memory.limit_in_bytes")):
            raise Unavailable(f"no cgroup-v1 memory controller at {CGROUP_ROOT}")
        path = os.path.join(CGROUP_ROOT, f"lego-{self.prefix}-{os.getpid()}-{name}")
        self.push(("rmcgroup", path))
        os.mkdir(path)
        write(os.path.join(path, "memory.swappiness"), "60")
        if limit is not None:
            write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
        return path

    def mark(self):
        """A point to roll back to with `undo_to`."""
        return len(self.undo)

    def undo_to(self, mark):
        while len(self.undo) > mark:
            self._undo_one(self.undo[-1])
            self.undo.pop()
            self._save()


class Unavailable(Exception):
    pass


def read(path):
    with open(path) as f:
        return f.read().strip()


def write(path, value):
    with open(path, "w") as f:
        f.write(value)


def cgroup_runner(tmp):
    """A prefix command that moves itself into $LEGO_CGROUP, then
    execs the program."""
    path = os.path.join(tmp, "in-cgroup")
    with open(path, "w") as f:
        f.write('#!/bin/sh\necho $$ > "$LEGO_CGROUP/cgroup.procs" || exit 125\nexec "$@"\n')
    os.chmod(path, 0o755)
    return path
