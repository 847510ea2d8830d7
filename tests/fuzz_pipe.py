"""What the fuzz tests share: a long-lived worker subprocess fed cases over a
pipe (a crash or hang of the worker fails one example, and the next one
starts a fresh worker), the worker's side of that pipe, the hypothesis
settings of a derandomized run or a time budget, and the summary printed
(and appended to KVCOMP_FUZZ_REPORT) at the end of a module.

Used by tests/test_fuzz.py (tests/fuzz_worker.py) and tests/test_kvc_fuzz.py
(tests/kvc_fuzz_worker.py). Protocol: length-prefixed pickles, a case to the
worker, a reply dict back; the worker answers {"ready": True} first."""
from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback

from hypothesis import HealthCheck, settings


# ------------------------------------------------------------ parent side
class WorkerDied(Exception):
    pass


class Worker:
    """``script`` as a subprocess, fed cases over a pipe; an answer must come
    within ``timeout`` seconds."""

    def __init__(self, script: str, timeout: float):
        self.script, self.timeout = script, timeout
        self.proc = None
        self.starts = 0

    def start(self):
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen([sys.executable, self.script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.starts += 1
        self._read(120)  # the ready message (importing torch takes a while)

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _stderr_tail(self):
        self.stderr.seek(0)
        return self.stderr.read()[-3000:].decode(errors="replace")

    def _read(self, timeout):
        out = self.proc.stdout
        deadline = time.monotonic() + timeout
        data = b""
        need = 4
        while len(data) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                self.stop()
                raise WorkerDied(f"no answer within {timeout:.0f} s (hang)")
            chunk = os.read(out.fileno(), need - len(data))
            if not chunk:
                self._died("worker died")
            data += chunk
            if len(data) == 4 and need == 4:
                need = 4 + struct.unpack("<I", data)[0]
        return pickle.loads(data[4:])

    def _died(self, what):
        code = self.proc.wait()
        tail = self._stderr_tail()
        self.proc = None
        raise WorkerDied(f"{what} with exit code {code} (signal {-code} if < 0)\n{tail}")

    def run(self, case):
        if self.proc is None:
            self.start()
        data = pickle.dumps(case)
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._died("worker died after its previous answer")
        return self._read(self.timeout)


# ------------------------------------------------------------ worker side
def _read(stream):
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack("<I", head)
    return pickle.loads(stream.read(n))


def _write(stream, obj):
    data = pickle.dumps(obj)
    stream.write(struct.pack("<I", len(data)) + data)
    stream.flush()


def _mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def serve(run_case, mem_headroom: int, threads: int):
    """The worker's loop: read a case, answer with run_case's dict or
    {"fail": traceback}. Address space is capped at what torch mapped on
    import plus ``mem_headroom`` bytes, so a huge allocation fails cleanly
    instead of swapping (a CUDA build of torch maps far more than a CPU one,
    even on a machine without a GPU)."""
    import resource

    import torch
    limit = _mapped_bytes() + mem_headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(threads)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from C++ or Python must not corrupt the protocol
    inp = sys.stdin.buffer
    _write(out, {"ready": True})
    while True:
        case = _read(inp)
        if case is None:
            return
        try:
            reply = run_case(case)
        except Exception:  # a failed check, or an exception type torch's checks never raise
            reply = {"fail": traceback.format_exc(limit=6)}
        _write(out, reply)


# ------------------------------------------------------------ the tests
def fuzz_settings(seconds: float, examples: int, **kw) -> settings:
    """A time budget (``seconds``): fresh random examples, 100 a round (see
    :func:`run_rounds`); else ``examples`` derandomized ones, the same in
    every run."""
    common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True, **kw)
    if seconds:
        return settings(max_examples=100, derandomize=False, **common)
    return settings(max_examples=examples, derandomize=True, database=None, **common)


def run_rounds(fuzz, seconds: float) -> None:
    """One round of ``fuzz`` (a @given test), then more until ``seconds``
    (0: none) have passed."""
    deadline = time.monotonic() + seconds
    fuzz()
    while seconds and time.monotonic() < deadline:
        fuzz()


def print_summary(request, text: str) -> None:
    """Prints ``text`` even when pytest captures output, and appends it to
    KVCOMP_FUZZ_REPORT when that is set."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + text)
    if os.environ.get("KVCOMP_FUZZ_REPORT"):
        with open(os.environ["KVCOMP_FUZZ_REPORT"], "a") as f:
            f.write(text + "\n")
