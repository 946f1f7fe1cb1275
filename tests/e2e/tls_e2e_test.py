"""The API's transport security end to end: the real kvmid binary, certificates made by openssl
in the test (daemon/security/testing/make_cert.sh), the Python client and kvmictl.

- the right client certificate works (kvmi_client, kvmictl with flags and with KVMID_* variables);
- a client certificate from another CA, an expired one, none at all, and plaintext are refused;
- the server certificate is rotated the way cert-manager does it (a symlinked directory swapped)
  and a new connection sees the new certificate's serial without a restart, while a stream
  opened before stays up;
- plaintext on a non-loopback address, and TCP without TLS files, are refused at start; a
  plaintext caller on loopback (--api_tcp_insecure_plaintext) has no identity: UNAUTHENTICATED on
  every RPC of the service;
- roles over TLS: client certificates per role made by scripts/dev-certs.sh (SPIFFE IDs
  spiffe://kvmid.dev/role/<role>), bound in the config, one of them scoped to one guest: each
  role's calls pass, calls above its role and outside its scope are PERMISSION_DENIED naming the
  RPC and the role, lists show only the guests in scope; the audit log names the certificate's
  identity and the TCP peer of an allowed and of a denied WritePhysical; a responder's CRASH
  verdict is refused (admin only) and the guest lives on;
- under umask 000 the API socket has exactly its configured mode."""

import json
import os
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import unittest

import grpc
import kvmi_client as kc
from google.protobuf import symbol_database
from tests.test_support import stop_process, wait_for

KVMID = "daemon/kvmid"
KVMI_SIM = "kernel/sim/kvmi-sim"
KVMICTL = "clients/python/kvmictl"
MAKE_CERT = "daemon/security/testing/make_cert.sh"
DEV_CERTS = "scripts/dev-certs.sh"
ROLES = ("viewer", "responder", "operator", "admin")


def make_cert(*args):
    subprocess.run(["bash", MAKE_CERT, *args], check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_serial(port, certs):
    """The serial number (hex, as openssl prints it) of the certificate kvmid presents to a new
    TLS connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(certs, "ca.pem"))
    context.load_cert_chain(os.path.join(certs, "admin.pem"), os.path.join(certs, "admin.key"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=der,
                         capture_output=True, check=True).stdout.decode()
    return out.strip().split("=", 1)[1].upper()


def call_every_rpc(channel, vm="sim-vm-0000"):
    """Calls every method of kvmi.v1.Introspection once on `channel` (requests naming `vm` where
    they name a guest; Attach sends a claim), returns {name: (grpc.StatusCode, details)}."""
    service = kc.pb.DESCRIPTOR.services_by_name["Introspection"]
    codes = {}
    for method in service.methods:
        request = symbol_database.Default().GetSymbol(method.input_type.full_name)()
        if "vm" in method.input_type.fields_by_name:
            request.vm = vm
        path = "/%s/%s" % (service.full_name, method.name)
        kwargs = dict(request_serializer=type(request).SerializeToString,
                      response_deserializer=lambda b: b)
        try:
            if method.client_streaming:
                claim = kc.pb.AttachRequest(claim=kc.pb.Claim(handler_id="anonymous", vms=[vm]))
                list(channel.stream_stream(path, **kwargs)(iter([claim]), timeout=10))
            elif method.server_streaming:
                list(channel.unary_stream(path, **kwargs)(request, timeout=10))
            else:
                channel.unary_unary(path, **kwargs)(request, timeout=10)
            codes[method.name] = (grpc.StatusCode.OK, "")
        except grpc.RpcError as e:
            codes[method.name] = (e.code(), e.details() or "")
    return codes


class TlsEndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kvmid-tls-", dir="/tmp")
        c = cls.certs = os.path.join(cls.dir, "certs")
        make_cert("ca", c, "ca")
        make_cert("ca", c, "other-ca")
        for name, ca, extra in (("admin", "ca", []), ("stranger", "other-ca", []),
                                ("expired", "ca", ["client", "expired"])):
            make_cert("leaf", c, name, ca, "kvmid-" + name,
                      "URI:spiffe://kvmid.test/role/admin", *extra)
        # The server's files as cert-manager/kubelet lay them out: tls/tls.crt -> ..data/tls.crt,
        # ..data -> a timestamped directory; rotation swaps ..data atomically.
        cls.tls = os.path.join(cls.dir, "tls")
        os.makedirs(cls.tls)
        cls.serials = {"first": "1001AA", "second": "2002BB"}
        for generation, serial in cls.serials.items():
            make_cert("leaf", c, "server-" + generation, "ca", "kvmid",
                      "DNS:localhost,IP:127.0.0.1", "server", "", serial)
        cls._publish("first")
        for name in ("tls.crt", "tls.key", "ca.crt"):
            os.symlink(os.path.join("..data", name), os.path.join(cls.tls, name))

        with open(os.path.join(cls.dir, "cookie"), "w") as f:
            f.write("secret")
        # The TLS clients' identity is bound to admin (without a binding only UNIX root is).
        cls.config = os.path.join(cls.dir, "kvmid.textproto")
        with open(cls.config, "w") as f:
            f.write('authz { bindings { principal: "spiffe://kvmid.test/role/admin" '
                    'role: "admin" } }\n')
        cls.port = free_port()
        cls.api = os.path.join(cls.dir, "api.sock")
        cls.log = open(os.path.join(cls.dir, "kvmid.log"), "w+")
        cls.kvmid = subprocess.Popen(
            [KVMID, "--config=" + cls.config, "--kvmi_socket=%s/k.sock" % cls.dir,
             "--api_socket=" + cls.api, "--api_tcp=127.0.0.1:%d" % cls.port, "--cookie_file=%s/cookie" % cls.dir,
             "--api_tls_cert=%s/tls.crt" % cls.tls, "--api_tls_key=%s/tls.key" % cls.tls,
             "--api_tls_client_ca=%s/ca.crt" % cls.tls, "--api_tls_refresh_seconds=1",
             "--log_events=none"],
            stdout=cls.log, stderr=subprocess.STDOUT)
        cls.sims = []
        wait_for(lambda: os.path.exists(cls.api) and cls._tcp_up(), 20, "kvmid's listeners")

    @classmethod
    def _publish(cls, generation):
        """Writes a new timestamped directory and points ..data at it in one rename."""
        target = "..%s" % generation
        path = os.path.join(cls.tls, target)
        os.makedirs(path)
        for src, dst in (("server-%s.pem" % generation, "tls.crt"),
                         ("server-%s.key" % generation, "tls.key"), ("ca.pem", "ca.crt")):
            with open(os.path.join(cls.certs, src), "rb") as f:
                data = f.read()
            with open(os.path.join(path, dst), "wb") as f:
                f.write(data)
        tmp = os.path.join(cls.tls, "..data_tmp")
        os.symlink(target, tmp)
        os.rename(tmp, os.path.join(cls.tls, "..data"))

    @classmethod
    def _tcp_up(cls):
        try:
            socket.create_connection(("127.0.0.1", cls.port), timeout=1).close()
            return True
        except OSError:
            return False

    @classmethod
    def tearDownClass(cls):
        for sim in cls.sims:
            stop_process(sim)
        stop_process(cls.kvmid)
        cls.log.seek(0)
        log = cls.log.read()
        cls.log.close()
        if cls.kvmid.returncode not in (0, None):
            print(log)

    def start_sim(self, seed):
        """One simulated guest; its UUID follows from `seed`."""
        sim = subprocess.Popen(
            [KVMI_SIM, "--connect=unix:%s/k.sock" % self.dir, "--cookie_file=%s/cookie" % self.dir,
             "--vms=1", "--vcpus=1", "--seed=%d" % seed, "--duration=120", "--log_level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.sims.append(sim)
        return sim

    def client(self, cert="admin", ca="ca", **kwargs):
        c = self.certs
        return kc.Client("127.0.0.1:%d" % self.port, connect_timeout=3,
                         ca=os.path.join(c, ca + ".pem"),
                         cert=os.path.join(c, cert + ".pem") if cert else None,
                         key=os.path.join(c, cert + ".key") if cert else None, **kwargs)

    def kvmictl(self, *args, env=None):
        return subprocess.run(["/usr/bin/python3", KVMICTL, *args], capture_output=True,
                              text=True, timeout=60, env=env)

    # ---- the right certificate -----------------------------------------------------------

    def test_right_certificate_python(self):
        with self.client() as kvmi:
            self.assertIsInstance(kvmi.list_vms(), list)
            self.assertIsInstance(kvmi.policies(), list)

    def test_right_certificate_kvmictl_flags_and_environment(self):
        c = self.certs
        result = self.kvmictl("--target=127.0.0.1:%d" % self.port, "--ca", c + "/ca.pem",
                              "--cert", c + "/admin.pem", "--key", c + "/admin.key", "vms")
        self.assertEqual(result.returncode, 0, result.stderr)
        env = dict(os.environ, KVMID_TARGET="127.0.0.1:%d" % self.port, KVMID_CA=c + "/ca.pem",
                   KVMID_CERT=c + "/admin.pem", KVMID_KEY=c + "/admin.key")
        result = self.kvmictl("policies", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_unix_socket_needs_no_certificate(self):
        with kc.Client("unix:" + self.api) as kvmi:
            self.assertIsInstance(kvmi.list_vms(), list)
        with self.assertRaises(ValueError):
            kc.Client("unix:" + self.api, ca=os.path.join(self.certs, "ca.pem"))

    # ---- refused -------------------------------------------------------------------------

    def assertRefused(self, **kwargs):
        with self.client(**kwargs) as kvmi:
            with self.assertRaises(kc.Unreachable) as caught:
                kvmi.list_vms()
            self.assertIn("TLS", caught.exception.message)

    def test_client_certificate_of_another_ca_is_refused(self):
        self.assertRefused(cert="stranger")

    def test_expired_client_certificate_is_refused(self):
        self.assertRefused(cert="expired")

    def test_missing_client_certificate_is_refused(self):
        self.assertRefused(cert=None)

    def test_client_that_does_not_trust_the_server_refuses(self):
        self.assertRefused(ca="other-ca")

    def test_plaintext_client_is_refused(self):
        with kc.Client("127.0.0.1:%d" % self.port, connect_timeout=2) as kvmi:
            with self.assertRaises(kc.Unreachable):
                kvmi.list_vms()

    def test_kvmictl_with_a_refused_certificate_exits_4(self):
        c = self.certs
        result = self.kvmictl("--target=127.0.0.1:%d" % self.port, "--ca", c + "/ca.pem",
                              "--cert", c + "/expired.pem", "--key", c + "/expired.key", "vms")
        self.assertEqual(result.returncode, 4, result.stderr)  # kvmid unreachable
        self.assertIn("TLS", result.stderr)

    # ---- rotation ------------------------------------------------------------------------

    def test_rotation_without_restart_keeps_open_streams(self):
        self.assertEqual(server_serial(self.port, self.certs), self.serials["first"])
        with self.client() as kvmi:
            stream = kvmi.watch_vms()
            changes = []
            def read():
                try:
                    changes.extend(stream)
                except grpc.RpcError as e:  # cancel() below ends it; nothing else may
                    if e.code() != grpc.StatusCode.CANCELLED:
                        raise

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            guests = lambda: {ch.vm.uuid for ch in list(changes)}
            self.start_sim(11)
            wait_for(lambda: len(guests()) == 1, 20,
                     "the guest started before the rotation, on the stream")

            self._publish("second")
            wait_for(lambda: server_serial(self.port, self.certs) == self.serials["second"], 20,
                     "the new certificate on a new connection")
            # A brand-new client works with the new certificate...
            with self.client() as fresh:
                self.assertIsInstance(fresh.list_vms(), list)
            # ...and the stream opened before the rotation is still up: it sees a new guest.
            self.start_sim(22)
            wait_for(lambda: len(guests()) == 2, 20,
                     "the guest started after the rotation, on the old stream")
            self.assertTrue(reader.is_alive())
            stream.cancel()
        self.assertIsNone(self.kvmid.poll(), "kvmid restarted or died")


def attach_and_close(kvmi, vm, fallback=None):
    """Claims `vm`'s CR events on an Attach stream (raises if the claim is refused), then ends
    the stream."""
    kvmi.attach("matrix", vms=[vm], events=["CR"], fallback=fallback).close()


class TlsRoles(unittest.TestCase):
    """Client certificates per role from scripts/dev-certs.sh, bound in the config file; the
    operator's binding covers one guest only."""

    VMS = ["sim-vm-0000", "sim-vm-0001"]

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kvmid-roles-", dir="/tmp")
        cls.certs = os.path.join(cls.dir, "certs")
        subprocess.run(["bash", DEV_CERTS, cls.certs, "localhost"], check=True,
                       stdout=subprocess.DEVNULL)
        bindings = []
        for role in ROLES:
            scope = ' guests { names: "%s" }' % cls.VMS[0] if role == "operator" else ""
            bindings.append('bindings { principal: "spiffe://kvmid.dev/role/%s" role: "%s"%s }'
                            % (role, role, scope))
        config = os.path.join(cls.dir, "kvmid.textproto")
        with open(config, "w") as f:
            f.write("authz {\n  %s\n}\n" % "\n  ".join(bindings))
        cls.port = free_port()
        cls.api = os.path.join(cls.dir, "api.sock")
        cls.log = open(os.path.join(cls.dir, "kvmid.log"), "w+")
        c = cls.certs
        cls.procs = [subprocess.Popen(
            [KVMID, "--kvmi_socket=%s/k.sock" % cls.dir, "--api_socket=" + cls.api,
             "--config=" + config, "--api_tcp=127.0.0.1:%d" % cls.port,
             "--api_tls_cert=%s/server.pem" % c, "--api_tls_key=%s/server.key" % c,
             "--api_tls_client_ca=%s/ca.pem" % c, "--log_events=none", "--metrics_address=",
             "--state_dir=%s/state" % cls.dir, "--audit_log=%s/audit.log" % cls.dir],
            stdout=cls.log, stderr=subprocess.STDOUT)]
        wait_for(lambda: os.path.exists(cls.api) or cls.procs[0].poll() is not None, 20,
                 "kvmid's API socket")
        cls.procs.append(subprocess.Popen(
            [KVMI_SIM, "--connect=unix:%s/k.sock" % cls.dir, "--vms=2", "--vcpus=1",
             "--scenario=mixed", "--rate=5", "--duration=120", "--reconnect=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        with kc.Client("unix:" + cls.api) as root:
            wait_for(lambda: sorted(vm.name for vm in root.list_vms()
                                    if vm.state == kc.pb.VM_STATE_HOOKED) == cls.VMS, 20,
                     "two hooked guests")

    @classmethod
    def tearDownClass(cls):
        for proc in reversed(cls.procs):
            stop_process(proc)
        cls.log.close()

    def client(self, role):
        c = self.certs
        return kc.Client("127.0.0.1:%d" % self.port, connect_timeout=5, ca=c + "/ca.pem",
                         cert="%s/%s.pem" % (c, role), key="%s/%s.key" % (c, role))

    def test_viewer_cannot_write_memory_and_admin_can(self):
        vm = self.VMS[0]
        with self.client("admin") as admin:
            admin.write_physical(vm, 0x4000, b"admin-wrote")
        with self.client("viewer") as viewer:
            with self.assertRaises(kc.KvmiError) as caught:
                viewer.write_physical(vm, 0x4000, b"VIEWER")
        e = caught.exception
        self.assertEqual(e.code, grpc.StatusCode.PERMISSION_DENIED, e)
        for needle in ("WritePhysical", vm, 'needs role "admin"', "spiffe://kvmid.dev/role/viewer",
                       '"viewer"'):
            self.assertIn(needle, e.message)
        with self.client("admin") as admin:
            self.assertEqual(admin.read_physical(vm, 0x4000, 11), b"admin-wrote")
        # Both are in the audit log under the certificate's identity and the TCP peer.
        def records(principal, code):
            with open(os.path.join(self.dir, "audit.log")) as f:
                lines = [json.loads(line) for line in f]
            return [r for r in lines if r["rpc"] == "WritePhysical" and r["code"] == code
                    and r["identity"] == {"kind": "tls", "principal": principal}
                    and r["args"].get("gpa") == "0x4000"]
        denied = wait_for(lambda: records("spiffe://kvmid.dev/role/viewer", "PERMISSION_DENIED"),
                          10, "the viewer's denied WritePhysical in the audit log")
        written = wait_for(lambda: records("spiffe://kvmid.dev/role/admin", "OK"), 10,
                           "the admin's WritePhysical in the audit log")
        for record, size in ((denied[0], len(b"VIEWER")), (written[0], len(b"admin-wrote"))):
            self.assertRegex(record["peer"], r"^ipv4:127\.0\.0\.1:\d+$")
            self.assertEqual(record["guest"]["name"], vm)
            self.assertEqual(record["args"]["size"], size)
        self.assertEqual(denied[0]["message"], e.message)

    def test_crash_verdict_needs_admin(self):
        """A responder's CRASH verdict is refused (VerdictError naming ACTION_CRASH and admin);
        the event keeps waiting for another verdict and the guest lives on."""
        inside = self.VMS[0]
        with self.client("responder") as responder:
            handler = responder.attach("crash-test", vms=[inside], events=["CR"],
                                       arm_events=["CR"], arm_crs=[3], deadline_ms=5000)
            try:
                event = handler.next_event(timeout=20)
                self.assertIsNotNone(event, "no CR event from %s" % inside)
                handler.answer(event, action="crash")
                errors = wait_for(lambda: [e for e in handler.errors if e.event_id == event.id],
                                  10, "the CRASH verdict's refusal")
                for needle in ("ACTION_CRASH", inside, '"admin"',
                               "spiffe://kvmid.dev/role/responder"):
                    self.assertIn(needle, errors[0].message)
                handler.answer(event, action="continue")
            finally:
                handler.close()
        with kc.Client("unix:" + self.api) as root:
            wait_for(lambda: root.get_vm(inside).state == kc.pb.VM_STATE_HOOKED, 10,
                     "the guest still hooked")
            self.assertEqual(root.get_vm(inside).connections, 1, "the guest was not crashed")

    def test_each_role_in_and_out_of_scope(self):
        inside, other = self.VMS
        OK, DENIED = "OK", "PERMISSION_DENIED"
        # (what, call, {role: expected}); a role not named expects OK.
        calls = [
            ("ListVMs", lambda k: sorted(vm.name for vm in k.list_vms()), {}),
            ("GetVM other", lambda k: k.get_vm(other), {"operator": DENIED}),
            ("ListPolicies", lambda k: k.policies(), {}),
            ("ReadPhysical", lambda k: k.read_physical(inside, 0x1000, 8),
             {"viewer": DENIED, "responder": DENIED}),
            ("ReadPhysical other", lambda k: k.read_physical(other, 0x1000, 8),
             {"viewer": DENIED, "responder": DENIED, "operator": DENIED}),
            ("GetRegisters", lambda k: k.get_registers(inside, 0),
             {"viewer": DENIED, "responder": DENIED}),
            ("PauseVCPU", lambda k: (k.pause(inside, 0), k.resume(inside, 0)),
             {"viewer": DENIED, "responder": DENIED}),
            ("WritePhysical", lambda k: k.write_physical(inside, 0x1000, b"x"),
             {"viewer": DENIED, "responder": DENIED, "operator": DENIED}),
            ("ApplyPolicy", lambda k: k.apply_policy(
                kc.protect_pages_policy("matrix", 0x1000, 0x1fff, monitor=True)),
             {"viewer": DENIED, "responder": DENIED, "operator": DENIED}),
            ("DeletePolicy", lambda k: k.delete_policy("matrix"),
             {"viewer": DENIED, "responder": DENIED, "operator": DENIED}),
            # Attach: responder and up, the claim within the caller's scope, a CRASH fallback
            # for admin only.
            ("Attach", lambda k: attach_and_close(k, inside), {"viewer": DENIED}),
            ("Attach other", lambda k: attach_and_close(k, other),
             {"viewer": DENIED, "operator": DENIED}),
            ("Attach crash", lambda k: attach_and_close(k, inside, fallback="crash"),
             {"viewer": DENIED, "responder": DENIED, "operator": DENIED}),
        ]
        for role in ROLES:
            with self.client(role) as kvmi:
                for what, call, expected in calls:
                    with self.subTest(role=role, call=what):
                        try:
                            value = call(kvmi)
                            got, message = OK, ""
                        except kc.KvmiError as e:
                            got, message = e.code.name, e.message
                        self.assertEqual(got, expected.get(role, OK), message)
                        if got == DENIED:
                            self.assertIn(what.split()[0], message)
                            self.assertIn("spiffe://kvmid.dev/role/" + role, message)
                        if what == "ListVMs":
                            self.assertEqual(value, [inside] if role == "operator" else self.VMS)
        self.assertIsNone(self.procs[0].poll())


class RefusedAtStart(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kvmid-tls-", dir="/tmp")
        self.base = [KVMID, "--kvmi_socket=%s/k.sock" % self.dir,
                     "--api_socket=%s/a.sock" % self.dir]

    def assertRefused(self, args, *needles):
        result = subprocess.run(self.base + args, capture_output=True, text=True, timeout=20)
        self.assertEqual(result.returncode, 2, result.stderr)
        for needle in needles:
            self.assertIn(needle, result.stderr)

    def test_plaintext_on_a_non_loopback_address(self):
        self.assertRefused(["--api_tcp=0.0.0.0:0", "--api_tcp_insecure_plaintext"],
                           "only on a loopback address", "0.0.0.0")

    def test_tcp_without_tls_files(self):
        self.assertRefused(["--api_tcp=127.0.0.1:0"], "mutual TLS only",
                           "api_tls_cert, api_tls_key, api_tls_client_ca")

    def test_unreadable_tls_file(self):
        self.assertRefused(["--api_tcp=127.0.0.1:0", "--api_tls_cert=/nonexistent/c.pem",
                            "--api_tls_key=/nonexistent/k.pem", "--api_tls_client_ca=/x.pem"],
                           "api_tls_cert", "/nonexistent/c.pem")

    def test_bad_socket_mode(self):
        self.assertRefused(["--api_socket_mode=0999"], "--api_socket_mode")

    def test_plaintext_on_loopback_starts_with_a_warning(self):
        port = free_port()
        log = open(os.path.join(self.dir, "kvmid.log"), "w+")
        kvmid = subprocess.Popen(self.base + ["--api_tcp=127.0.0.1:%d" % port,
                                              "--api_tcp_insecure_plaintext"],
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            with kc.Client("127.0.0.1:%d" % port, connect_timeout=10) as kvmi:
                # Served, but a plaintext caller has no identity: refused as unauthenticated.
                with self.assertRaises(kc.KvmiError) as refused:
                    kvmi.list_vms()
                self.assertEqual(refused.exception.code, grpc.StatusCode.UNAUTHENTICATED)
            log.seek(0)
            self.assertIn("PLAINTEXT", log.read())
        finally:
            stop_process(kvmid)
            log.close()

    def test_plaintext_caller_is_unauthenticated_on_every_rpc(self):
        port = free_port()
        kvmid = subprocess.Popen(self.base + ["--api_tcp=127.0.0.1:%d" % port,
                                              "--api_tcp_insecure_plaintext",
                                              "--state_dir=%s/state" % self.dir],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            with kc.Client("127.0.0.1:%d" % port, connect_timeout=10) as kvmi:
                kvmi._connect()  # the listener is up
                codes = call_every_rpc(kvmi._channel)
            # every RPC of kvmi.v1.Introspection
            self.assertEqual(len(codes),
                             len(kc.pb.DESCRIPTOR.services_by_name["Introspection"].methods))
            self.assertGreaterEqual(len(codes), 29)
            for rpc, (code, message) in codes.items():
                self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED, (rpc, message))
                self.assertIn(rpc, message)
            # The UNIX socket still knows its callers: root is admin there.
            with kc.Client("unix:%s/a.sock" % self.dir) as kvmi:
                self.assertIsInstance(kvmi.list_vms(), list)
                kvmi.apply_policy(kc.protect_pages_policy("root-policy", 0x1000, 0x1fff))
                self.assertEqual([p.policy.name for p in kvmi.policies()], ["root-policy"])
        finally:
            stop_process(kvmid)


class SocketModeUnderUmask000(unittest.TestCase):
    def check_mode(self, flags, expected):
        d = tempfile.mkdtemp(prefix="kvmid-um-", dir="/tmp")
        api = os.path.join(d, "run", "api.sock")  # kvmid creates the directory too
        kvmid = subprocess.Popen([KVMID, "--kvmi_socket=%s/k.sock" % d, "--api_socket=" + api,
                                  *flags], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: os.umask(0))
        try:
            wait_for(lambda: os.path.exists(api), 20, "the API socket")
            mode = stat.S_IMODE(os.stat(api).st_mode)
            self.assertEqual(mode, expected, oct(mode))
            self.assertFalse(mode & 0o007, "world-accessible")
            self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(api)).st_mode), 0o750)
            with kc.Client("unix:" + api) as kvmi:
                self.assertIsInstance(kvmi.list_vms(), list)
            # Only once kvmid answers: api.sock appears (rename) a moment before the private
            # directory it was bound in is removed.
            self.assertEqual(sorted(os.listdir(os.path.dirname(api))), ["api.sock"])
        finally:
            stop_process(kvmid)
        self.assertFalse(os.path.exists(api), "the socket outlived kvmid")

    def test_default_mode(self):
        self.check_mode([], 0o660)

    def test_configured_mode(self):
        self.check_mode(["--api_socket_mode=0600"], 0o600)


if __name__ == "__main__":
    unittest.main()
