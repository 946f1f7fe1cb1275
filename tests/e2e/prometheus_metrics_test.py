"""kvmid's metrics as an operator sees them: the kvmid binary with the demo policies and a fleet
of simulated guests (kvmi-sim), scraped every second by a real Prometheus server (Debian's
`prometheus`). Through Prometheus's HTTP query API the event counters rise and the verdict latency
histogram gives a quantile; `promtool check metrics` finds nothing to say about kvmid's
/metrics; /healthz and /readyz answer 200; gRPC health reports kvmi.v1.Introspection SERVING.
Skips (with the reason) only where the prometheus package is not installed."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

import grpc

KVMID = "daemon/kvmid"
KVMI_SIM = "kernel/sim/kvmi-sim"
DEMO_CONFIG = "daemon/config/examples/demo.textproto"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
DEADLINE_SECONDS = 45  # the whole test stays well under a minute


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    """(status, body); status 0 if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return 0, ""


def wait_for(what, predicate, deadline):
    """Polls `predicate` until it returns something truthy or `deadline` (time.monotonic) passes."""
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError("timed out waiting for %s (last: %r)" % (what, last))


@unittest.skipUnless(os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK),
                     "Debian package 'prometheus' is not installed (scripts/setup.sh installs it)")
class PrometheusScrapesKvmid(unittest.TestCase):
    def setUp(self):
        self.deadline = time.monotonic() + DEADLINE_SECONDS
        self.dir = tempfile.mkdtemp(prefix="kvmid-prom-", dir="/tmp")
        self.procs = []
        with open(os.path.join(self.dir, "cookie"), "w") as f:
            f.write("prometheus-e2e")
        self.metrics_port = free_port()
        self.metrics = "http://127.0.0.1:%d" % self.metrics_port
        self.kvmid = self.start(
            "kvmid",
            [KVMID, "--config=" + DEMO_CONFIG, "--kvmi_socket=%s/kvmi.sock" % self.dir,
             "--api_socket=%s/api.sock" % self.dir,
             "--cookie_file=%s/cookie" % self.dir, "--log_events=none",
             "--state_dir=%s/state" % self.dir,
             "--metrics_address=127.0.0.1:%d" % self.metrics_port])
        wait_for("kvmid's /readyz", lambda: http_get(self.metrics + "/readyz")[0] == 200,
                 self.deadline)
        self.start("kvmi-sim",
                   [KVMI_SIM, "--connect=unix:%s/kvmi.sock" % self.dir,
                    "--cookie_file=%s/cookie" % self.dir, "--vms=4", "--vcpus=2",
                    "--scenario=mixed", "--rate=200", "--duration=%d" % DEADLINE_SECONDS,
                    "--reconnect=0", "--log_level=warn"])
        self.prometheus_port = free_port()
        self.prometheus = "http://127.0.0.1:%d" % self.prometheus_port
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n"
                    "  scrape_interval: 1s\n"
                    "  scrape_timeout: 1s\n"
                    "scrape_configs:\n"
                    "  - job_name: kvmid\n"
                    "    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % self.metrics_port)
        self.start("prometheus",
                   [PROMETHEUS, "--config.file=" + config,
                    "--storage.tsdb.path=" + os.path.join(self.dir, "tsdb"),
                    "--web.listen-address=127.0.0.1:%d" % self.prometheus_port,
                    "--log.level=warn"])

    def start(self, name, argv):
        log = open(os.path.join(self.dir, name + ".log"), "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, log))
        return proc

    def tearDown(self):
        for name, proc, log in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
        if self.kvmid.returncode not in (0, None):
            with open(os.path.join(self.dir, "kvmid.log")) as f:
                print(f.read()[-4000:])
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, promql):
        """The instant vector's values (floats); [] if none (yet)."""
        url = self.prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body = http_get(url)
        if status != 200:
            return []
        result = json.loads(body)
        self.assertEqual(result["status"], "success", body)
        return [float(sample["value"][1]) for sample in result["data"]["result"]]

    def test_prometheus_sees_events_and_latencies(self):
        # Prometheus scrapes kvmid.
        wait_for("Prometheus to scrape kvmid", lambda: self.query('up{job="kvmid"}') == [1.0],
                 self.deadline)

        # The event counters rise: what the policies decided, seen twice, later higher.
        events = 'sum(kvmid_events_total{decided_by="policy"})'
        first = wait_for("policy-decided events", lambda: (self.query(events) or [0])[0],
                         self.deadline)
        wait_for("the event counter to rise",
                 lambda: (self.query(events) or [0])[0] > first, self.deadline)
        self.assertTrue(self.query('sum(kvmid_events_total{action="keep_old"})'),
                        "the demo's locked registers are kept (KEEP_OLD)")
        hooked = wait_for("4 hooked guests",
                          lambda: self.query('kvmid_guests{state="hooked"}') == [4.0],
                          self.deadline)
        self.assertTrue(hooked)
        self.assertGreaterEqual(self.query('kvmid_handshakes_total{result="completed"}')[0], 4)

        # A verdict latency histogram: a quantile over the buckets' rate.
        quantile = ('histogram_quantile(0.99, sum by (le) '
                    '(rate(kvmid_verdict_latency_seconds_bucket{decided_by="policy"}[5s])))')
        p99 = wait_for("a p99 verdict latency",
                       lambda: [v for v in self.query(quantile) if v == v], self.deadline)
        self.assertGreater(p99[0], 0)
        self.assertLess(p99[0], 1.0)  # an in-daemon policy answers in far less than a second

        # The API is counted too (this very query path is not gRPC: make one call).
        self.check_grpc_health()
        wait_for("API calls counted",
                 lambda: self.query('sum(kvmid_api_calls_total{service="grpc.health.v1.Health"})'),
                 self.deadline)

        # Process metrics.
        self.assertGreater(self.query('process_resident_memory_bytes{job="kvmid"}')[0], 1e6)

        # Health endpoints.
        self.assertEqual(http_get(self.metrics + "/healthz"), (200, "ok\n"))
        self.assertEqual(http_get(self.metrics + "/readyz"), (200, "ready\n"))

        # promtool's linter has nothing to say about kvmid's exposition.
        status, text = http_get(self.metrics + "/metrics")
        self.assertEqual(status, 200)
        lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                              text=True, timeout=20)
        self.assertEqual(lint.returncode, 0, lint.stdout + lint.stderr)
        self.assertEqual(lint.stdout.strip() + lint.stderr.strip(), "")

        # SIGTERM: kvmid restores its guests and exits 0.
        self.kvmid.send_signal(signal.SIGTERM)
        self.assertEqual(self.kvmid.wait(timeout=15), 0)

    def check_grpc_health(self):
        """grpc.health.v1.Health/Check for kvmi.v1.Introspection by name, with hand-encoded
        messages (HealthCheckRequest{service=1}; SERVING is status=1: bytes 08 01). On the UNIX
        socket: no plaintext TCP listener is needed (gRPC's health service answers any caller
        that connects; kvmi.v1 calls on plaintext TCP would be UNAUTHENTICATED)."""
        name = b"kvmi.v1.Introspection"
        with grpc.insecure_channel("unix:%s/api.sock" % self.dir) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            response = check(b"\x0a" + bytes([len(name)]) + name, timeout=5)
            self.assertEqual(response, b"\x08\x01")
            with self.assertRaises(grpc.RpcError) as unknown:
                check(b"\x0a\x07unknown", timeout=5)
            self.assertEqual(unknown.exception.code(), grpc.StatusCode.NOT_FOUND)


if __name__ == "__main__":
    unittest.main()
