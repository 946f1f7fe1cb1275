#!/usr/bin/python3
"""Locks a guest's kernel text: a protect_pages policy leaves a GPA range read+execute only, and
every write attempt into it (a violator) is logged from the event stream.

    examples/lock_kernel_text.py --target unix:/run/kvmid/api.sock sim-vm-0000 \\
        --gpa 0x1000000-0x1ffffff --duration 60

The policy blocks writes by default (RETRY: the write does not happen); --monitor only reports
them. It stays applied after the script exits unless --remove is given, since a lock that
disappears with its logger would be a surprise.
"""

import argparse
import collections
import os
import sys
import threading

# clients/python, as invoked first (Bazel runfiles hold the generated modules), then resolved.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.append(os.path.join(os.path.dirname(os.path.realpath(__file__)), ".."))
import kvmi_client as kc  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vm", help="guest name or UUID")
    parser.add_argument("--target", default=os.environ.get("KVMID_TARGET", kc.DEFAULT_TARGET))
    parser.add_argument("--gpa", default="0x1000000-0x1ffffff",
                        help="kernel text, FIRST-LAST or FIRST+SIZE (default %(default)s)")
    parser.add_argument("--allow", default="rx", help="access left allowed (default rx)")
    parser.add_argument("--name", help="policy name (default ktext-lock-VM)")
    parser.add_argument("--monitor", action="store_true", help="report, do not block")
    parser.add_argument("--duration", type=float, default=0, help="seconds (0: until Ctrl-C)")
    parser.add_argument("--remove", action="store_true", help="delete the policy on exit")
    args = parser.parse_args()
    try:
        first, last = kc.parse_range(args.gpa)
    except ValueError as e:
        parser.error("--gpa: %s" % e)
    name = args.name or "ktext-lock-%s" % args.vm

    violators = collections.Counter()  # (vm, vcpu, rip) -> attempts
    client = kc.Client(args.target)
    try:
        vm = client.get_vm(args.vm)  # fails early, with NOT_FOUND, on a typo
        policy = kc.protect_pages_policy(
            name, first, last, allowed=args.allow, vms=[vm.uuid], monitor=args.monitor,
            description="lock_kernel_text.py: %s text 0x%x-0x%x" % (vm.name, first, last))
        # The example's own policy name: re-running it replaces its earlier policy.
        replaced = client.apply_policy(policy, allow_replace=True).replaced
        print("%s %s: %s pages 0x%x-0x%x keep only '%s'%s" % (
            "replaced" if replaced else "applied", name, vm.name or vm.uuid, first, last,
            args.allow, " (monitor)" if args.monitor else ""), flush=True)

        # Violations are the PF events in the range on this guest; the access letters left out
        # of `allowed` are what was attempted.
        denied = "".join(c for c in "rwx" if c not in args.allow)
        stream = client.events(allow=kc.event_filter(
            vms=[vm.uuid], events=["pf"], gpa=(first, last), access=denied))
        if args.duration:
            timer = threading.Timer(args.duration, stream.cancel)
            timer.daemon = True
            timer.start()
        try:
            with stream:
                for item in stream:
                    if isinstance(item, kc.Dropped):
                        print("!! %d violations not shown (reader too slow)" % item.dropped,
                              flush=True)
                        continue
                    violators[(item.vm_name, item.vcpu, item.rip)] += 1
                    print("VIOLATION %s vCPU %d rip 0x%x %s gpa 0x%x gva 0x%x => %s by %s" % (
                        item.vm_name, item.vcpu, item.rip, item.pf.access, item.pf.gpa,
                        item.pf.gva, kc.action_name(item.action),
                        item.decided_by + "".join(" [monitor:%s]" % m for m in item.monitor_hits)),
                        flush=True)
        except KeyboardInterrupt:
            pass
        for status in client.policies():
            if status.policy.name == name:
                print("policy %s: %d hits, %d enforced" % (
                    name, status.counters.hits, status.counters.enforced))
    except kc.KvmiError as e:
        print("lock_kernel_text: %s" % e, file=sys.stderr)
        return 2 if isinstance(e, kc.Unreachable) else 1
    finally:
        if args.remove:
            try:
                client.delete_policy(name)
                print("removed %s" % name)
            except kc.KvmiError:
                pass
        client.close()

    print("violators (vm, vCPU, rip -> attempts):")
    for (vm_name, vcpu, rip), n in violators.most_common(20):
        print("  %-14s %-3d 0x%x  %d" % (vm_name, vcpu, rip, n))
    print("total: %d violations from %d sites" % (sum(violators.values()), len(violators)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
