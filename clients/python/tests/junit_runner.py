"""Runs a unittest file and writes JUnit XML to $XML_OUTPUT_FILE, one <testcase> per test.

Bazel writes its own one-case XML for a test target that leaves none; scripts/test.sh counts
cases from these files, so each Python test method has to show up here to be counted.
(Debian's python3-pytest would do this with --junitxml, but is one more package to install.)

    junit_runner.py path/to/some_test.py [unittest args...]
"""

import importlib.util
import os
import sys
import time
import traceback
import unittest
import xml.etree.ElementTree as ET


class _Result(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cases = []  # (test, outcome, text, seconds)
        self._start = 0.0

    def startTest(self, test):
        self._start = time.monotonic()
        super().startTest(test)

    def _record(self, test, outcome, text=""):
        self.cases.append((test, outcome, text, time.monotonic() - self._start))

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, "failure", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._record(test, "passed")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._record(test, "failure", "unexpected success")


def _write_xml(path, suite_name, cases, seconds):
    suite = ET.Element("testsuite", name=suite_name, tests=str(len(cases)),
                       failures=str(sum(c[1] == "failure" for c in cases)),
                       errors=str(sum(c[1] == "error" for c in cases)),
                       skipped=str(sum(c[1] == "skipped" for c in cases)),
                       time="%.3f" % seconds)
    for test, outcome, text, secs in cases:
        # setUpClass failures are reported on a _ErrorHolder with no method name.
        test_id = test.id()
        cls, _, name = test_id.rpartition(".")
        case = ET.SubElement(suite, "testcase", classname=cls or suite_name, name=name,
                             time="%.3f" % secs)
        if outcome in ("failure", "error"):
            ET.SubElement(case, outcome, message=text.strip().splitlines()[-1][:500]
                          if text.strip() else outcome).text = text
        elif outcome == "skipped":
            ET.SubElement(case, "skipped", message=text)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: junit_runner.py TEST_FILE.py [unittest args]")
    path = sys.argv[1]
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    start = time.monotonic()
    try:
        spec.loader.exec_module(module)
        loader = unittest.TestLoader()
        suite = (loader.loadTestsFromNames(sys.argv[2:], module) if len(sys.argv) > 2
                 else loader.loadTestsFromModule(module))
        runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2, resultclass=_Result)
        result = runner.run(suite)
        cases = result.cases
        ok = result.wasSuccessful() and result.testsRun > 0
    except Exception:  # an import error is one failed case, not a silent pass
        text = traceback.format_exc()
        sys.stderr.write(text)

        class _Load(unittest.TestCase):
            def runTest(self):
                pass
        load = _Load()
        load.id = lambda: "%s.load" % name
        cases, ok = [(load, "error", text, 0.0)], False
    out = os.environ.get("XML_OUTPUT_FILE")
    if out:
        _write_xml(out, name, cases, time.monotonic() - start)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
