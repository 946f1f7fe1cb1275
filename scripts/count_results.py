#!/usr/bin/env python3
"""Counts test cases for scripts/test.sh and prints the final `N passed, N failed` line.

Inputs:
  --bep FILE   a Bazel --build_event_json_file of one `bazel test` step. Every test target's
               test.xml (JUnit XML: gtest writes one per binary, Bazel writes one for other tests)
               gives its test cases; a target that failed to build or has no test.xml counts as one
               failed case, so nothing is lost silently.
  --junit FILE extra JUnit XML (the fuzz runs write one case per fuzz target).
  --label NAME names the step of the following --bep/--junit in the report (unit, asan, ...).

Exit status: 0 if nothing failed, 1 otherwise. The last line of output is always the count.
"""
import json
import sys
import urllib.parse
import xml.etree.ElementTree as ET


def cases_from_junit(path):
    """Yields (name, outcome) with outcome in passed/failed/skipped."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        yield (path, "failed", "unreadable test.xml: %s" % e)
        return
    for case in root.iter("testcase"):
        name = "%s.%s" % (case.get("classname", ""), case.get("name", ""))
        if case.find("failure") is not None or case.find("error") is not None:
            yield (name, "failed", "")
        elif (case.get("status") == "notrun" or case.get("result") == "skipped"
              or case.find("skipped") is not None):
            yield (name, "skipped", "")
        else:
            yield (name, "passed", "")


def cases_from_bep(path):
    """Yields (name, outcome, note) for every test target of one `bazel test` invocation."""
    results = {}  # (label, run, shard) -> (attempt, status, xml path)
    tests = set()  # labels of test rules (only these are counted; a broken library shows up
    #                through the tests that depend on it and through bazel's exit status)
    broken = {}  # test label -> why it has no result
    try:
        with open(path) as f:
            events = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        yield (path, "failed", "no build event file: %s" % e)
        return
    for event in events:
        eid = event.get("id", {})
        if "targetConfigured" in eid and "configured" in event:
            if event["configured"].get("targetKind", "").endswith("_test rule"):
                tests.add(eid["targetConfigured"]["label"])
        elif "testResult" in eid and "testResult" in event:
            tid = eid["testResult"]
            key = (tid["label"], tid.get("run", 1), tid.get("shard", 1))
            attempt = tid.get("attempt", 1)
            xml = None
            for out in event["testResult"].get("testActionOutput", []):
                if out.get("name") == "test.xml":
                    xml = urllib.parse.urlparse(out["uri"]).path
            if key not in results or attempt >= results[key][0]:
                results[key] = (attempt, event["testResult"].get("status", ""), xml)
        elif "targetCompleted" in eid:
            label = eid["targetCompleted"]["label"]
            if "aborted" in event:
                broken[label] = "not built: " + event["aborted"].get("reason", "aborted")
            elif event.get("completed", {}).get("success") is False:
                broken[label] = "failed to build"
    seen = set()
    for (label, _, _), (_, status, xml) in sorted(results.items()):
        seen.add(label)
        if xml is None:
            yield (label, "failed" if status != "PASSED" else "passed", "no test.xml (%s)" % status)
            continue
        n = failed = 0
        for name, outcome, note in cases_from_junit(xml):
            n += 1
            failed += outcome == "failed"
            yield ("%s %s" % (label, name), outcome, note)
        if n == 0:
            yield (label, "passed" if status == "PASSED" else "failed", "no test cases")
        elif failed == 0 and status not in ("PASSED", "FLAKY"):
            # e.g. a crash after the last test case: every case passed, the target did not.
            yield (label, "failed", "target status %s" % status)
    for label in sorted(tests - seen):
        if label in broken:
            yield (label, "failed", broken[label])


def main():
    # Inputs are handled in command-line order, each under the latest --label.
    steps = []
    label = "tests"
    argv = sys.argv[1:]
    if len(argv) % 2:
        sys.exit("usage: count_results.py [--label NAME] [--bep FILE] [--junit FILE] "
                 "[--failed-step NAME] ...")
    for flag, value in zip(argv[::2], argv[1::2]):
        if flag == "--label":
            label = value
        elif flag == "--bep":
            steps.append((label, cases_from_bep(value)))
        elif flag == "--junit":
            steps.append((label, cases_from_junit(value)))
        elif flag == "--failed-step":
            steps.append((label, iter([(value, "failed", "step failed without results")])))
        else:
            sys.exit("count_results.py: unknown flag " + flag)

    per_step = {}  # label -> counts, in first-seen order
    for label, cases in steps:
        counts = per_step.setdefault(label, {"passed": 0, "failed": 0, "skipped": 0})
        for name, outcome, note in cases:
            counts[outcome] += 1
            if outcome == "failed":
                print("FAILED [%s] %s%s" % (label, name, (" -- " + note) if note else ""))
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for label, counts in per_step.items():
        print("step %-6s %d passed, %d failed, %d skipped"
              % (label, counts["passed"], counts["failed"], counts["skipped"]))
        for k in totals:
            totals[k] += counts[k]
    line = "%d passed, %d failed" % (totals["passed"], totals["failed"])
    if totals["skipped"]:
        line += ", %d skipped" % totals["skipped"]
    print(line)
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
