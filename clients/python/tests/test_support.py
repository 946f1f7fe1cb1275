"""Helpers shared by the Python end-to-end tests (clients/python/tests, tests/e2e)."""

import signal
import subprocess
import time


def wait_for(predicate, timeout, what):
    """Polls `predicate` until it returns something truthy (returned) or `timeout` seconds pass
    (AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))


def stop_process(proc, grace=10):
    """SIGTERM, then SIGKILL if `proc` has not exited after `grace` seconds; reaps it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
