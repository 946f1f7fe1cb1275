#!/usr/bin/env python3
"""Checks buf curl's JSON output (one or more JSON documents, concatenated) for the buf curl test.

  json_check.py list_vms N          < out   # N guests, all hooked, 2 vCPUs, sim-vm-* names
  json_check.py get_vm NAME UUID    < out   # the guest NAME, with that UUID (from ListVMs)
  json_check.py uuid NAME           < out   # prints the UUID of guest NAME in a ListVMs answer
  json_check.py events TYPE [MSR [DECIDED_BY]] < out   # >= 1 event, every one of TYPE (and MSR)
  json_check.py policies NAME...    < out   # ListPolicies names every NAME
Exits 1 with a reason when the output does not match.
"""
import json
import sys


def docs(text):
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        doc, i = decoder.raw_decode(text, i)
        out.append(doc)


def die(why):
    print("json_check: " + why)
    sys.exit(1)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    found = docs(sys.stdin.read())
    if not found:
        die("no JSON document")
    if cmd == "list_vms":
        vms = found[0].get("vms", [])
        if len(vms) != int(args[0]):
            die("%d guests, expected %s" % (len(vms), args[0]))
        for vm in vms:
            if vm.get("state") != "VM_STATE_HOOKED" or vm.get("vcpuCount") != 2:
                die("guest not hooked with 2 vCPUs: %r" % vm)
            if not vm.get("name", "").startswith("sim-vm-") or len(vm.get("uuid", "")) != 36:
                die("bad name or uuid: %r" % vm)
        print("%d guests hooked" % len(vms))
    elif cmd == "uuid":
        for vm in found[0].get("vms", []):
            if vm.get("name") == args[0]:
                print(vm["uuid"])
                return
        die("no guest " + args[0])
    elif cmd == "get_vm":
        vm = found[0]
        if vm.get("name") != args[0] or vm.get("uuid") != args[1]:
            die("got %r" % vm)
        if "KVMI_GET_REGISTERS" not in vm.get("allowedCommands", []):
            die("allowedCommands lacks KVMI_GET_REGISTERS")
        print("guest %s %s" % (args[0], args[1]))
    elif cmd == "events":
        events = [d["event"] for d in found if "event" in d]
        if not events:
            die("no event in %d messages" % len(found))
        for ev in events:
            if ev.get("type") != args[0]:
                die("event of another type: %r" % ev)
            if len(args) > 1 and str(ev.get("msr", {}).get("msr")) != args[1]:
                die("event for another MSR: %r" % ev)
            if len(args) > 2 and ev.get("decidedBy") != args[2]:
                die("event decided by another: %r" % ev)
            if not ev.get("vmName", "").startswith("sim-vm-") or not int(ev.get("id", "0")):
                die("event without guest or id: %r" % ev)
        print("%d events of %s" % (len(events), args[0]))
    elif cmd == "policies":
        names = {p["policy"]["name"] for p in found[0].get("policies", [])}
        missing = [n for n in args if n not in names]
        if missing:
            die("missing policies %s (have %s)" % (missing, sorted(names)))
        print("policies: " + ", ".join(sorted(names)))
    else:
        die("unknown check " + cmd)


if __name__ == "__main__":
    main()
