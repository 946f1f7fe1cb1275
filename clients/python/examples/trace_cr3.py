#!/usr/bin/python3
"""Traces CR3 writes (address-space switches) per vCPU and prints a summary at the end.

    examples/trace_cr3.py --target unix:/run/kvmid/api.sock --vm sim-vm-0000 --duration 10

CR3 writes are only intercepted while something asks for them, so the script applies a
monitor-mode policy matching CR3 writes (it never changes a verdict) for as long as it runs and
deletes it on exit; --no-arm leaves arming to others (e.g. a policy in kvmid's configuration).
"""

import argparse
import collections
import os
import sys
import threading
import time

# clients/python, as invoked first (Bazel runfiles hold the generated modules), then resolved.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.append(os.path.join(os.path.dirname(os.path.realpath(__file__)), ".."))
import kvmi_client as kc  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=os.environ.get("KVMID_TARGET", kc.DEFAULT_TARGET))
    parser.add_argument("--vm", action="append", default=[], help="guest name or UUID (repeat)")
    parser.add_argument("--duration", type=float, default=0, help="seconds (0: until Ctrl-C)")
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    parser.add_argument("--no-arm", action="store_true",
                        help="do not apply the monitor policy that arms CR3 interception")
    parser.add_argument("--policy-name", default="trace-cr3-%d" % os.getpid())
    args = parser.parse_args()

    counts = collections.Counter()                 # (vm, vcpu) -> CR3 writes
    spaces = collections.defaultdict(set)          # (vm, vcpu) -> distinct CR3 values
    last = {}                                      # (vm, vcpu) -> last CR3 value
    dropped = 0
    client = kc.Client(args.target)
    try:
        if not args.no_arm:
            policy = kc.policy_pb.Policy(
                name=args.policy_name, description="trace_cr3.py: arms CR3 interception",
                mode=kc.policy_pb.MODE_MONITOR, action=kc.policy_pb.ACTION_CONTINUE)
            policy.match.events.append(kc.policy_pb.EVENT_TYPE_CR)
            policy.match.cr = 3
            policy.guests.names.extend(args.vm)
            client.apply_policy(policy, allow_replace=True)  # its own name: re-runs replace it
        stream = client.events(allow=kc.event_filter(vms=args.vm, events=["cr"], crs=[3]))
        if args.duration:
            # The stream blocks between events; cancelling it ends the loop on time.
            timer = threading.Timer(args.duration, stream.cancel)
            timer.daemon = True
            timer.start()
        start = time.monotonic()
        try:
            with stream:
                for item in stream:
                    if isinstance(item, kc.Dropped):
                        dropped = item.dropped_total
                        print("!! missed %d CR3 writes (reader too slow)" % item.dropped,
                              file=sys.stderr)
                        continue
                    key = (item.vm_name or item.vm_uuid, item.vcpu)
                    counts[key] += 1
                    spaces[key].add(item.cr.new_value)
                    last[key] = item.cr.new_value
                    if not args.quiet:
                        print("%-14s vCPU %-3d cr3 0x%x -> 0x%x rip 0x%x" % (
                            key[0], key[1], item.cr.old_value, item.cr.new_value, item.rip))
        except KeyboardInterrupt:
            pass
        elapsed = max(time.monotonic() - start, 1e-6)
    except kc.KvmiError as e:
        print("trace_cr3: %s" % e, file=sys.stderr)
        return 2 if isinstance(e, kc.Unreachable) else 1
    finally:
        if not args.no_arm:
            try:
                client.delete_policy(args.policy_name)
            except kc.KvmiError:
                pass  # never applied, or kvmid is gone: nothing left armed for us
        client.close()

    print("\nCR3 writes per vCPU over %.1fs:" % elapsed)
    print("%-14s %-5s %8s %8s %16s %18s" % ("VM", "VCPU", "WRITES", "PER_S", "ADDR_SPACES",
                                            "LAST_CR3"))
    for key in sorted(counts):
        print("%-14s %-5d %8d %8.1f %16d %18s" % (key[0], key[1], counts[key],
                                                  counts[key] / elapsed, len(spaces[key]),
                                                  "0x%x" % last[key]))
    print("total: %d CR3 writes on %d vCPUs%s" % (
        sum(counts.values()), len(counts), ", %d missed" % dropped if dropped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
