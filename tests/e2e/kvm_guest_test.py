"""The product on real virtualization: kvmid, kvmi-vmm running the repository's guest kernel on
/dev/kvm, and a client of kvmid's API. What the guest prints on its console is compared with what
kvmid reads and reports; the guest's rootkit mode is blocked in enforce mode and only reported in
monitor mode; killing kvmid leaves the guest unrestricted until kvmid comes back and re-hooks it.

Skipped (with the reason) where /dev/kvm cannot be opened."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import kvmi_client as kc
from tests.test_support import stop_process, wait_for

KVMID = "daemon/kvmid"
VMM = "kernel/kvm/kvmi-vmm"
ENFORCE = "daemon/config/examples/kvm_rootkit.textproto"
MONITOR = "daemon/config/examples/kvm_rootkit_monitor.textproto"
LSTAR = 0xC0000082
KTEXT = (0x101000, 0x10FFFF)  # kernel/kvm/guest/layout.h
IDT = 0x111000
PROTECTED_PAGES = 16  # 15 pages of kernel text + the IDT page
VM_NAME = "kvm-e2e"


def kvm_unusable_reason():
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return None
    except OSError as e:
        return "/dev/kvm cannot be opened (%s): the real-guest tests need KVM" % e.strerror


class Console:
    """The guest's serial console (kvmi-vmm's stdout), line by line, from a reader thread."""

    PREFIX = "[guest] "

    def __init__(self, pipe):
        self.lines = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe):
        for raw in pipe:
            line = raw.rstrip("\n")
            if line.startswith(self.PREFIX):
                with self._cv:
                    self.lines.append(line[len(self.PREFIX):])
                    self._cv.notify_all()

    def count(self):
        with self._cv:
            return len(self.lines)

    def wait(self, pattern, start=0, timeout=20):
        """The first line at index >= start matching `pattern`: (index, match)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for i in range(start, len(self.lines)):
                    m = regex.search(self.lines[i])
                    if m:
                        return i, m
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(self.lines[-10:])
                    raise AssertionError("no console line /%s/ within %gs; last lines:\n%s"
                                         % (pattern, timeout, tail))
                self._cv.wait(remaining)


class Rig:
    """kvmid + kvmi-vmm in a short /tmp directory (UNIX socket paths are limited to 108 bytes)."""

    def __init__(self, test, config, guest_args, vmm_flags=()):
        reason = kvm_unusable_reason()
        if reason:
            raise unittest.SkipTest(reason)
        self.dir = tempfile.mkdtemp(prefix="kvm-e2e-", dir="/tmp")
        self.kvmi_socket = os.path.join(self.dir, "k.sock")
        self.api_socket = os.path.join(self.dir, "a.sock")
        self.cookie = os.path.join(self.dir, "cookie")
        with open(self.cookie, "w") as f:
            f.write("kvm-e2e-secret")
        self.config = config
        self.kvmid = None
        self.vmm = None
        self.stream = None
        self.events = []
        self._events_lock = threading.Lock()
        test.addCleanup(self.close)
        self.start_kvmid()
        self.client = kc.Client("unix:" + self.api_socket, timeout=10)
        self.vmm_log = open(os.path.join(self.dir, "vmm.log"), "w+")
        self.vmm = subprocess.Popen(
            [VMM, "--connect=unix:" + self.kvmi_socket, "--cookie_file=" + self.cookie,
             "--name=" + VM_NAME, "--duration=55", "--reconnect=0.1",
             "--guest_args=" + guest_args] + list(vmm_flags),
            stdout=subprocess.PIPE, stderr=self.vmm_log, text=True)
        self.console = Console(self.vmm.stdout)
        _, m = self.console.wait(r"^layout: ")
        self.layout = {k: int(v, 16) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+)", m.string)}

    def start_kvmid(self):
        self.kvmid_log = open(os.path.join(self.dir, "kvmid.log"), "a+")
        self.kvmid = subprocess.Popen(
            [KVMID, "--config=" + self.config, "--kvmi_socket=" + self.kvmi_socket,
             "--api_socket=" + self.api_socket, "--cookie_file=" + self.cookie,
             "--log_events=none", "--log_level=info",
             "--state_dir=" + os.path.join(self.dir, "state"), "--metrics_address="],
            stdout=self.kvmid_log, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.api_socket) and os.path.exists(self.kvmi_socket),
                 10, "kvmid's sockets")

    def collect_events(self):
        """Starts recording every event of the guest from kvmid's stream."""
        self.stream = self.client.events(allow=kc.event_filter(vms=[VM_NAME]))

        def run():
            try:
                for item in self.stream:
                    if not isinstance(item, kc.Dropped):
                        with self._events_lock:
                            self.events.append(item)
            except kc.KvmiError:
                pass  # kvmid went away or the stream was cancelled

        threading.Thread(target=run, daemon=True).start()

    def find_events(self, predicate):
        with self._events_lock:
            return [e for e in self.events if predicate(e)]

    def wait_armed(self):
        """Until kvmid's policies are armed on the guest (acknowledged by the host)."""

        def armed():
            try:
                vm = self.client.get_vm(VM_NAME)
            except kc.KvmiError:
                return False
            if vm.state != kc.pb.VM_STATE_HOOKED:
                return False
            pages = sum(lease.restricted_pages for lease in vm.leases)
            msrs = {m for lease in vm.leases for m in lease.msrs}
            return pages >= PROTECTED_PAGES and LSTAR in msrs and vm.arming_in_flight == 0

        wait_for(armed, 20, "kvmid's policies armed on the guest")

    def next_attempt(self, start):
        """The first complete rootkit attempt reported at console index >= start:
        {lstar, ktext, idt: (verdict, line), round: summary line, end: index}."""
        i, m = self.console.wait(r"^rootkit: attempt (\d+) lstar", start)
        n = m.group(1)
        result = {"number": int(n)}
        for key, pattern in (("lstar", r"lstar <- 0x[0-9a-f]+: (\w+)"),
                             ("ktext", r"ktext patch at 0x[0-9a-f]+: (\w+)"),
                             ("idt", r"idt write at 0x[0-9a-f]+: (\w+)")):
            j, mm = self.console.wait(r"^rootkit: attempt %s %s" % (n, pattern), i)
            result[key] = (mm.group(1), mm.string)
        j, mm = self.console.wait(r"^round %s: " % n, i)
        result["round"] = mm.string
        result["end"] = j + 1
        return result

    def close(self):
        if self.stream is not None:
            self.stream.cancel()
        for proc in (self.vmm, self.kvmid):
            stop_process(proc)
        if self.vmm is not None and self.vmm.stdout:
            self.vmm.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def in_ktext(address):
    return KTEXT[0] <= address <= KTEXT[1]


class RootkitIsBlockedInEnforceMode(unittest.TestCase):
    def test_text_patch_idt_write_and_lstar_hijack_fail_and_are_reported(self):
        rig = Rig(self, ENFORCE, "rootkit period_ms=50")
        rig.collect_events()
        rig.wait_armed()
        # The attempt under way while kvmid armed may be half-protected: judge the next two.
        first = rig.next_attempt(rig.console.count())
        for attempt in (rig.next_attempt(first["end"]), rig.next_attempt(first["end"] + 1)):
            self.assertEqual(attempt["lstar"][0], "blocked", attempt["lstar"][1])
            self.assertIn("lstar=%#x" % rig.layout["lstar"], attempt["lstar"][1])
            self.assertIn("syscalls through the hook: 0", attempt["lstar"][1])
            self.assertEqual(attempt["ktext"][0], "blocked", attempt["ktext"][1])
            self.assertEqual(attempt["idt"][0], "blocked", attempt["idt"][1])
            self.assertIn("(unchanged)", attempt["round"])
            self.assertIn("ktext_sum=%#x" % rig.layout["ktext_sum"], attempt["round"])
            self.assertIn("lstar=%#x" % rig.layout["lstar"], attempt["round"])

        hook = int(re.search(r"lstar <- (0x[0-9a-f]+)", first["lstar"][1]).group(1), 16)
        getpid = rig.layout["sys_getpid"]
        gate = rig.layout["idt"] + 3 * 16
        self.assertEqual(rig.layout["idt"], IDT)
        msr = wait_for(lambda: rig.find_events(
            lambda e: e.type == kc.policy_pb.EVENT_TYPE_MSR and e.msr.msr == LSTAR and
            e.msr.new_value == hook), 10, "the LSTAR write on the event stream")[0]
        self.assertEqual(msr.msr.old_value, rig.layout["lstar"])
        self.assertTrue(msr.kept_old_value)
        self.assertEqual(msr.decided_by, "policy:lstar-locked")
        self.assertTrue(in_ktext(msr.rip), hex(msr.rip))
        self.assertEqual(msr.vm_name, VM_NAME)

        text = wait_for(lambda: rig.find_events(
            lambda e: e.type == kc.policy_pb.EVENT_TYPE_PF and e.pf.gpa == getpid), 10,
            "the kernel text write on the event stream")[0]
        self.assertEqual(text.pf.access, "w")
        self.assertEqual(text.pf.gva, getpid)  # the guest's kernel is identity mapped
        self.assertEqual(text.action, kc.policy_pb.ACTION_RETRY)
        self.assertEqual(text.decided_by, "policy:ktext-wp")
        self.assertTrue(in_ktext(text.rip), hex(text.rip))

        idt = wait_for(lambda: rig.find_events(
            lambda e: e.type == kc.policy_pb.EVENT_TYPE_PF and e.pf.gpa == gate), 10,
            "the IDT write on the event stream")[0]
        self.assertEqual(idt.pf.access, "w")
        self.assertEqual(idt.action, kc.policy_pb.ACTION_RETRY)
        self.assertEqual(idt.decided_by, "policy:idt-wp")
        self.assertTrue(in_ktext(idt.rip), hex(idt.rip))


class RootkitIsOnlyReportedInMonitorMode(unittest.TestCase):
    def test_attacks_succeed_and_are_reported(self):
        rig = Rig(self, MONITOR, "rootkit period_ms=50")
        rig.collect_events()
        rig.wait_armed()
        first = rig.next_attempt(rig.console.count())
        attempt = rig.next_attempt(first["end"])
        self.assertEqual(attempt["lstar"][0], "HIJACKED", attempt["lstar"][1])
        self.assertNotIn("syscalls through the hook: 0", attempt["lstar"][1])
        self.assertEqual(attempt["ktext"][0], "PATCHED", attempt["ktext"][1])
        self.assertIn("getpid=0x1337", attempt["ktext"][1])
        self.assertEqual(attempt["idt"][0], "OVERWRITTEN", attempt["idt"][1])

        getpid = rig.layout["sys_getpid"]
        msr = wait_for(lambda: rig.find_events(
            lambda e: e.type == kc.policy_pb.EVENT_TYPE_MSR and e.msr.msr == LSTAR and
            e.msr.old_value == rig.layout["lstar"]), 10, "the LSTAR write")[0]
        self.assertEqual(msr.action, kc.policy_pb.ACTION_CONTINUE)
        self.assertFalse(msr.kept_old_value)
        self.assertIn("lstar-locked", msr.monitor_hits)
        text = wait_for(lambda: rig.find_events(
            lambda e: e.type == kc.policy_pb.EVENT_TYPE_PF and e.pf.gpa == getpid), 10, "the text write")[0]
        self.assertEqual(text.action, kc.policy_pb.ACTION_CONTINUE)
        self.assertIn("ktext-wp", text.monitor_hits)
        self.assertEqual(text.pf.access, "w")


class StateReadThroughKvmidMatchesTheGuest(unittest.TestCase):
    def test_registers_msrs_memory_and_pause(self):
        rig = Rig(self, ENFORCE, "period_ms=20")
        rig.wait_armed()
        rig.console.wait(r"^round \d+: ")  # every process has printed its CR3
        vm = rig.client.get_vm(VM_NAME)
        self.assertEqual(vm.vcpu_count, 1)
        # Events stock KVM cannot produce for user space are not offered (CHECK_EVENT -EPERM).
        for missing in (kc.policy_pb.EVENT_TYPE_CR, kc.policy_pb.EVENT_TYPE_XSETBV, kc.policy_pb.EVENT_TYPE_DESCRIPTOR,
                        kc.policy_pb.EVENT_TYPE_HYPERCALL):
            self.assertNotIn(missing, vm.allowed_events)
        for real in (kc.policy_pb.EVENT_TYPE_MSR, kc.policy_pb.EVENT_TYPE_PF, kc.policy_pb.EVENT_TYPE_BREAKPOINT,
                     kc.policy_pb.EVENT_TYPE_PAUSE_VCPU):
            self.assertIn(real, vm.allowed_events)

        regs = rig.client.get_registers(VM_NAME, 0, msrs=[LSTAR])
        self.assertEqual(regs.registers.r15, rig.layout["r15"])  # the guest's boot marker
        self.assertEqual(regs.mode, 8)
        self.assertEqual(regs.registers.efer & 0x500, 0x500)  # LME | LMA: long mode
        self.assertTrue(regs.registers.cr0 & 0x80000000)  # paging
        process_cr3 = {int(v, 16) for v in re.findall(r"cr3=(0x[0-9a-f]+)",
                                                      "\n".join(rig.console.lines))}
        self.assertIn(regs.registers.cr3, process_cr3 | {rig.layout["cr3"]})
        self.assertEqual({m.index: m.value for m in regs.msrs}, {LSTAR: rig.layout["lstar"]})

        page = rig.client.read_physical(VM_NAME, rig.layout["marker"], 4096)
        expected = b"".join(
            ((rig.layout["r15"] ^ (i * 0x9E3779B97F4A7C15)) & (2**64 - 1)).to_bytes(8, "little")
            for i in range(512))
        self.assertEqual(page, expected)

        # PAUSE_VCPU kicks the vCPU out of KVM_RUN: the console stops until resumed.
        self.assertEqual(rig.client.pause(VM_NAME, 0), [0])
        time.sleep(0.2)  # a line may have been on its way
        paused_at = rig.console.count()
        time.sleep(0.5)
        self.assertEqual(rig.console.count(), paused_at, "the guest ran while paused")
        regs = rig.client.get_registers(VM_NAME, 0)
        self.assertEqual(regs.registers.r15, rig.layout["r15"])
        # The guest runs on its own 4-level page tables, identity-mapping its kernel: kvmid's
        # walk of them (TranslateAddress, issue 15) gives the same addresses back.
        for gva in (rig.layout["marker"], rig.layout["lstar"]):
            t = rig.client.translate(VM_NAME, gva, vcpu=0, no_cache=True)
            self.assertTrue(t.present, "0x%x: %s" % (gva, t))
            self.assertEqual(t.gpa, gva)
            self.assertEqual(t.mode, kc.pb.PAGING_MODE_4LEVEL)
            self.assertEqual(t.cr3, regs.registers.cr3)
        self.assertEqual(rig.client.resume(VM_NAME, 0), [0])
        rig.console.wait(r"^round \d+: ", paused_at, timeout=5)


USER_BASE = 0x8000000000  # kernel/kvm/guest/guest.c: each process's program page (PML4 slot 1)


class VirtualMemoryOfTheRealGuestMatchesItsPageTables(unittest.TestCase):
    """kvmid's page walk (TranslateAddress, ReadVirtual, ReadVirtualStream, issue 15) against the
    tables the guest built for itself (kernel/kvm/guest: boot.S identity-maps the first 1 GiB
    with 2 MiB pages, supervisor only; guest.c gives each process a PML4 whose slot 1 maps its
    read-only program page and its writable stack page, user, 4 KiB). The oracle is the guest:
    the bytes it prints from its program page, its marker page's pattern, the CR3s it prints."""

    def test_translation_and_virtual_reads_follow_the_guests_own_tables(self):
        rig = Rig(self, ENFORCE, "period_ms=20")
        rig.wait_armed()
        rig.console.wait(r"^round \d+: ")  # every process has printed its CR3 and its text
        vm = VM_NAME
        marker = rig.layout["marker"]
        expected_marker = b"".join(
            ((rig.layout["r15"] ^ (i * 0x9E3779B97F4A7C15)) & (2**64 - 1)).to_bytes(8, "little")
            for i in range(512))
        # The kernel's identity map, in the vCPU's own address space.
        t = rig.client.translate(vm, marker + 0x18, vcpu=0, no_cache=True)
        self.assertTrue(t.present, str(t))
        self.assertEqual((t.gpa, t.page_size, t.level_name), (marker + 0x18, 2 << 20, "PDE"))
        self.assertEqual((t.writable, t.user), (True, False))
        r = rig.client.read_virtual(vm, marker, 4096, vcpu=0)
        self.assertTrue(r.complete, str(r.pages))
        self.assertEqual(r.data, expected_marker)
        # Beyond the 1 GiB the guest maps: PDPT[1] is empty.
        t = rig.client.translate(vm, 0x40000000, vcpu=0, no_cache=True)
        self.assertFalse(t.present)
        self.assertEqual(t.level_name, "PDPTE")
        # A 4 MiB streamed virtual read of kernel memory equals the physical read of it.
        start = marker & ~0xFFF
        virt = b"".join(c.data for c in rig.client.read_virtual_stream(
            vm, start, 4 << 20, vcpu=0, chunk_bytes=1 << 20) if c.complete)
        self.assertEqual(len(virt), 4 << 20)
        self.assertEqual(virt, rig.client.read_physical_bytes(vm, start, 4 << 20))

        # Each process's address space, from the CR3 it printed with its text.
        printed = {}
        for line in rig.console.lines:
            m = re.match(r"^proc (\d+): cr3=(0x[0-9a-f]+) (.*)$", line)
            if m:
                printed[int(m.group(2), 16)] = m.group(3).encode()
        self.assertGreaterEqual(len(printed), 2, "the processes printed no CR3")
        program_gpas = set()
        for cr3, text in printed.items():
            t = rig.client.translate(vm, USER_BASE + 5, cr3=cr3, mode="4level", no_cache=True)
            self.assertTrue(t.present, "cr3 0x%x: %s" % (cr3, t))
            self.assertEqual((t.page_size, t.level_name, t.user, t.writable),
                             (4096, "PTE", True, False))
            program_gpas.add(t.gpa - 5)
            page = rig.client.read_virtual(vm, USER_BASE, 4096, cr3=cr3, mode="4level")
            self.assertTrue(page.complete)
            self.assertIn(text, page.data)  # the bytes the process printed from that page
            self.assertEqual(page.data, rig.client.read_physical(vm, t.gpa - 5, 4096))
            stack = rig.client.translate(vm, USER_BASE + 4096, cr3=cr3, mode="4level")
            self.assertTrue(stack.present and stack.writable and stack.user, str(stack))
            # The third page is not mapped: the stream names exactly it.
            chunks = list(rig.client.read_virtual_stream(vm, USER_BASE, 3 * 4096, cr3=cr3,
                                                         mode="4level", chunk_bytes=4096))
            self.assertEqual([c.complete for c in chunks], [True, True, False])
            self.assertEqual([(p.gva, p.size) for p in chunks[2].unread],
                             [(USER_BASE + 2 * 4096, 4096)])
            self.assertIn("not present at PTE", chunks[2].unread[0].why)
        # Every process maps the same program page (user_start), each its own stack.
        self.assertEqual(len(program_gpas), 1)


class BreakpointAndHotAddedVcpuThroughKvmid(unittest.TestCase):
    def test_int3_goes_to_an_attached_handler_and_a_hot_added_vcpu_is_armed(self):
        rig = Rig(self, MONITOR, "int3=2 period_ms=50",
                  vmm_flags=["--vcpus=2", "--hotplug_vcpu_after_ms=1500"])
        rig.collect_events()
        site = rig.layout["int3_site"]
        with rig.client.attach("e2e-bp", vms=[VM_NAME], events=["breakpoint"],
                               arm_events=["breakpoint"], deadline_ms=5000) as handler:
            event = handler.next_event(timeout=20)
            self.assertIsNotNone(event, "no BREAKPOINT reached the handler")
            self.assertEqual(event.type, kc.policy_pb.EVENT_TYPE_BREAKPOINT)
            self.assertEqual(event.vcpu, 0)
            self.assertEqual(event.breakpoint.gpa, site)  # identity-mapped kernel
            self.assertEqual(event.breakpoint.insn_len, 1)
            self.assertEqual(event.registers.rip, site)
            start = rig.console.count()
            handler.answer(event, "continue")  # CONTINUE: the guest gets its own #BP
            rig.console.wait(r"^trap: #BP at rip=0x%x$" % site, start)
        # The vCPU the VMM adds while the guest runs: kvmid hears CREATE_VCPU, counts it, and
        # arms it like the others (here: the monitor policies' MSR exits) without an error; its
        # state is the real vCPU's (started by the VMM in long mode on the kernel's tables).
        wait_for(lambda: rig.find_events(
            lambda e: e.type == kc.policy_pb.EVENT_TYPE_CREATE_VCPU and e.vcpu == 2), 20,
            "CREATE_VCPU for the hot-added vCPU 2")
        wait_for(lambda: rig.client.get_vm(VM_NAME).vcpu_count == 3, 10, "3 vCPUs in kvmid")
        regs = rig.client.get_registers(VM_NAME, 2)
        self.assertEqual(regs.mode, 8)
        self.assertEqual(regs.registers.cr3, rig.layout["cr3"])
        self.assertEqual(list(rig.client.get_vm(VM_NAME).arm_errors), [])


class VmmFlagsAndShutdown(unittest.TestCase):
    def test_bad_flags_are_refused_before_touching_kvm(self):
        for flag, needle in (("--memory_mib=3", "--memory_mib"),
                             ("--guest_args=a\x01b", "--guest_args"),
                             ("--connect=tcp:1.2.3.4:5", "--connect"),
                             ("--reconnect=-1", "--reconnect"),
                             ("--name=", "--name"),
                             ("--vcpus=0", "--vcpus"),
                             ("--vcpus=9", "--vcpus"),
                             ("--hotplug_vcpu_after_ms=99999999", "--hotplug_vcpu_after_ms")):
            result = subprocess.run([VMM, flag, "--duration=1"], capture_output=True, text=True,
                                    timeout=10)
            self.assertEqual(result.returncode, 2, (flag, result.stderr))
            self.assertIn(needle, result.stderr)

    def test_sigterm_stops_the_guest_and_restores_it(self):
        rig = Rig(self, ENFORCE, "rootkit period_ms=50")
        rig.wait_armed()
        rig.vmm.send_signal(signal.SIGTERM)
        self.assertEqual(rig.vmm.wait(timeout=10), 0)
        rig.vmm_log.seek(0)
        summary = rig.vmm_log.read()
        self.assertRegex(summary, r"kvmi-vmm summary: .* sessions 1\b")
        self.assertNotIn("guest stopped", summary)
        wait_for(lambda: rig.client.get_vm(VM_NAME).state == kc.pb.VM_STATE_GONE, 10,
                 "kvmid to see the guest gone")
        # kvmi-vmm asked kvmid to unhook (KVMI_EVENT_UNHOOK) before going away, as QEMU does.
        rig.kvmid_log.flush()
        rig.kvmid_log.seek(0)
        self.assertIn("unhooking: the host sent KVMI_EVENT_UNHOOK", rig.kvmid_log.read())


class KillingKvmidLeavesTheGuestRunningUnrestricted(unittest.TestCase):
    def test_unrestricted_without_kvmid_and_rehooked_on_restart(self):
        rig = Rig(self, ENFORCE, "rootkit period_ms=50")
        rig.wait_armed()
        first = rig.next_attempt(rig.console.count())
        attempt = rig.next_attempt(first["end"])
        self.assertEqual(attempt["ktext"][0], "blocked")

        rig.kvmid.kill()  # SIGKILL: no restoring by kvmid; the host side releases everything
        rig.kvmid.wait()
        first = rig.next_attempt(rig.console.count())
        attempt = rig.next_attempt(first["end"])
        self.assertEqual(attempt["lstar"][0], "HIJACKED", attempt["lstar"][1])
        self.assertEqual(attempt["ktext"][0], "PATCHED", attempt["ktext"][1])
        self.assertEqual(attempt["idt"][0], "OVERWRITTEN", attempt["idt"][1])

        os.unlink(rig.kvmi_socket)
        os.unlink(rig.api_socket)
        rig.start_kvmid()
        rig.client = kc.Client("unix:" + rig.api_socket, timeout=10)
        rig.wait_armed()
        self.assertGreaterEqual(rig.client.get_vm(VM_NAME).connections, 1)
        first = rig.next_attempt(rig.console.count())
        attempt = rig.next_attempt(first["end"])
        self.assertEqual(attempt["lstar"][0], "blocked", attempt["lstar"][1])
        self.assertEqual(attempt["ktext"][0], "blocked", attempt["ktext"][1])
        self.assertEqual(attempt["idt"][0], "blocked", attempt["idt"][1])
        self.assertIn("(unchanged)", attempt["round"])


if __name__ == "__main__":
    unittest.main()
