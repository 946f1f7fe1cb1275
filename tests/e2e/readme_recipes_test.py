"""Every recipe of README.md, run as written against a real kvmid and simulated guests.

Each fenced code block of README.md must follow a marker line

    <!-- recipe: NAME [key=value ...] -->

or this test fails naming the block's line, so a new recipe cannot be skipped silently. Keys:

  run=sh|python      run it (default: the fence's language); run=output: the block is sample
                     output (of="kvmictl events": checked against kvmictl's table format);
                     run=manual why="...": not run, for that reason (e.g. Bazel itself)
  timeout=S          seconds each command (or the Python program) may take (default 120)
  stream=S           how long a command tagged (Ctrl-C stops), or a Python program that does
                     not end, runs before it gets SIGINT (default 5); it must print something
  ready="PATH HOST:PORT ..."   after the block: sockets and ports to wait for (its daemons)
  wait="COMMAND"     before the block: a shell command polled until it succeeds (60 s)
  expect="REGEX"     the block's standard output must match (Python re, multiline)

Shell blocks run in order in one shell session, as a user types them: variables persist from one
block to the next. Each command (a line, with its continuation lines) runs as its own process,
so each has its own status, time limit and output. Trailing comments tag commands:
`(exit N or M)` the statuses it may end with (default 0); `(Ctrl-C stops)` a stream, stopped
after stream=S; `(runs until stopped)` a daemon, left running (its block's ready= says when it is
up) and stopped with SIGTERM at the end, when it must exit 0. Python blocks run with
/usr/bin/python3 and clients/python on sys.path.

The recipes use the README's own paths (/run/kvmid/api.sock, /tmp/kvmid-certs, 127.0.0.1:50051,
/opt/kvmi-venv, /var/lib/kvmid): they run in private mount, network and pid namespaces (unshare)
where /run and /tmp are empty tmpfs, /opt and /var/lib are copy-on-write overlays of the host's,
the network is a loopback of its own, and nothing started outlives the test. The working
directory is a tree shaped like the repository (the runfiles: scripts/, clients/, proto/,
daemon/config/examples/, bazel-bin/daemon/kvmid, bazel-bin/kernel/sim/kvmi-sim). grpcurl is not
packaged for Debian 12: `grpcurl` there is tests/e2e/grpcurl_shim.py, which runs the same call
with buf curl (scripts/setup.sh installs it) and answers `describe` and `list SERVICE` from
server reflection itself.

And after all recipes, every policy kvmid had once its guests were up (the configuration's) is
still there, unchanged: no recipe weakens a baseline protection.

Fixing a recipe is editing README.md only.
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))  # the runfiles root under Bazel
README = os.environ.get("KVMID_README", os.path.join(REPO, "README.md"))

MARKER = re.compile(r"^<!--\s*recipe:\s*(?P<name>[A-Za-z0-9_.-]+)(?P<attrs>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[A-Za-z0-9_+-]*)")
KEYS = {"run", "why", "of", "timeout", "stream", "ready", "wait", "expect"}
RUNS = {"sh", "python", "output", "manual"}
DEFAULT_TIMEOUT = 120
DEFAULT_STREAM = 5
WAIT_SECONDS = 60
ASSIGNMENT = re.compile(r"^(export\s+)?[A-Za-z_][A-Za-z0-9_]*=")
EXIT_TAG = re.compile(r"\(exit ([0-9][0-9 ,or]*)\)")


class Recipe:
    def __init__(self, name, attrs, lang, code, line):
        self.name, self.attrs, self.lang, self.code, self.line = name, attrs, lang, code, line
        self.run = attrs.get("run") or {"sh": "sh", "bash": "sh", "python": "python"}.get(lang)


def parse_readme(text):
    """(recipes, problems): the fenced blocks with their markers, and what is wrong with them."""
    recipes, problems, names = [], [], set()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, fence, lang = i, m.group("fence"), m.group("lang")
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        where = "README.md:%d" % (start + 1)
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = MARKER.match(lines[before].strip()) if before >= 0 else None
        if not marker:
            problems.append("%s: a ```%s block without a <!-- recipe: NAME ... --> line before "
                            "it (tests/e2e/readme_recipes_test.py says how to mark it)"
                            % (where, lang))
            continue
        try:
            attrs = dict(part.split("=", 1) for part in shlex.split(marker.group("attrs")))
        except ValueError as e:
            problems.append("%s: marker attributes: %s" % (where, e))
            continue
        recipe = Recipe(marker.group("name"), attrs, lang, "\n".join(body) + "\n", start + 1)
        unknown = set(attrs) - KEYS
        if unknown:
            problems.append("%s: unknown marker keys %s" % (where, sorted(unknown)))
        if recipe.run not in RUNS:
            problems.append("%s: run=%s (the fence says %r): one of %s"
                            % (where, recipe.run, lang, sorted(RUNS)))
        if recipe.run == "manual" and not attrs.get("why"):
            problems.append("%s: run=manual needs why=\"...\"" % where)
        if recipe.name in names:
            problems.append("%s: recipe name %s used twice" % (where, recipe.name))
        names.add(recipe.name)
        recipes.append(recipe)
    return recipes, problems


def commands(code):
    """The commands of a shell block: lines joined with their continuation lines, comment-only
    lines left out. Each is (text, tags)."""
    out, current = [], []
    for line in code.splitlines():
        if not current and (not line.strip() or line.strip().startswith("#")):
            continue
        current.append(line)
        if line.endswith("\\"):
            continue
        text = "\n".join(current)
        current = []
        out.append(text)
    if current:
        out.append("\n".join(current))
    return out


class Command:
    def __init__(self, ident, recipe, text, mode, limit, statuses):
        self.id, self.recipe, self.text, self.mode = ident, recipe, text, mode
        self.limit, self.statuses = limit, statuses


def plan(recipes):
    """The commands to run, in order."""
    steps = []
    for r in recipes:
        if r.run not in ("sh", "python"):
            continue
        limit = float(r.attrs.get("timeout", DEFAULT_TIMEOUT))
        stream = float(r.attrs.get("stream", DEFAULT_STREAM))
        if r.run == "python":
            mode = "stream" if "stream" in r.attrs else "fg"
            steps.append(Command("%s.py" % r.name, r, r.code, mode,
                                 stream if mode == "stream" else limit, {0}))
            continue
        for n, text in enumerate(commands(r.code)):
            ident = "%s.%d" % (r.name, n + 1)
            tag = EXIT_TAG.search(text)
            statuses = {int(x) for x in re.findall(r"\d+", tag.group(1))} if tag else {0}
            if "(runs until stopped)" in text:
                steps.append(Command(ident, r, text, "daemon", limit, {0}))
            elif "(Ctrl-C stops)" in text:
                steps.append(Command(ident, r, text, "stream", stream, {0}))
            elif ASSIGNMENT.match(text) and not re.search(r"[;&|`]|\$\(", text.split("#")[0]):
                steps.append(Command(ident, r, text, "set", limit, {0}))
            else:
                steps.append(Command(ident, r, text, "fg", limit, statuses))
    return steps


PRELUDE = r"""
set -u
work="$1"; root="$2"; results="$work/results"
# Private mounts (unshare makes them private): the README's paths, empty or copy-on-write.
mount -t tmpfs tmpfs "$work/ovl"
for d in opt var/lib; do
  n="${d//\//_}"
  mkdir -p "$work/ovl/$n.up" "$work/ovl/$n.work"
  mount -t overlay overlay \
    -o "lowerdir=/$d,upperdir=$work/ovl/$n.up,workdir=$work/ovl/$n.work" "/$d"
done
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/kvmid
ip link set lo up
export PATH="$work/bin:$PATH" HOME="$work/home" XDG_CACHE_HOME="$work/cache"
export BUF_CACHE_DIR="$work/cache/buf"
mkdir -p "$HOME" "$XDG_CACHE_HOME"
cd "$root"
daemons=()
record() { echo "$1 $2 $3" >>"$results"; }
# Every variable a recipe sets is exported: each command runs in a child shell.
set -a
"""

EPILOGUE = r"""
for ((i = ${#daemons[@]} - 1; i >= 0; i--)); do
  kill -TERM "${daemons[$i]%% *}" 2>/dev/null
  start=$SECONDS
  wait "${daemons[$i]%% *}"; rc=$?
  record "${daemons[$i]#* }" "$rc" $((SECONDS - start))
done
"""


def shell_word(text):
    return "'" + text.replace("'", "'\\''") + "'"


def script(steps, work):
    """The bash program that runs `steps` in the namespace; each step's status goes to
    $work/results, its output to $work/out/ID.{out,err}."""
    out = [PRELUDE]
    seen = set()
    for step in steps:
        r = step.recipe
        o, e = "$work/out/%s.out" % step.id, "$work/out/%s.err" % step.id
        if r.name not in seen:
            seen.add(r.name)
            if "wait" in r.attrs:
                out.append('start=$SECONDS; until bash -c %s >/dev/null 2>&1; do '
                           '[ $((SECONDS - start)) -ge %d ] && break; sleep 0.2; done; '
                           'bash -c %s >/dev/null 2>&1; record %s $? $((SECONDS - start))'
                           % (shell_word(r.attrs["wait"]), WAIT_SECONDS,
                              shell_word(r.attrs["wait"]), shell_word(r.name + ".wait")))
        if step.mode == "set":
            out.append("eval %s >%s 2>%s; record %s $? 0" % (shell_word(step.text), o, e,
                                                              step.id))
        elif step.mode == "daemon":
            out.append("bash -c %s >%s 2>%s </dev/null & daemons+=(\"$! %s\")"
                       % (shell_word(step.text), o, e, step.id))
        else:
            if step.id.endswith(".py"):
                path = "$work/recipes/%s" % step.id
                command = "env PYTHONPATH=$root/clients/python /usr/bin/python3 %s" % path
            else:
                command = "bash -c %s" % shell_word(step.text)
            # A stream gets one SIGINT, as from a terminal's Ctrl-C. Without --foreground, timeout
            # signals its child and then its whole process group, so the child got two: the
            # second one interrupted grpcio's channel.close() in the Python client, which then
            # hung in the channel's __del__ (status 137, about 1 run in 4).
            signal = "--foreground -s INT" if step.mode == "stream" else "-s TERM"
            out.append("start=$SECONDS; timeout %s -k 10 %g %s >%s 2>%s </dev/null; "
                       "record %s $? $((SECONDS - start))"
                       % (signal, step.limit, command, o, e, step.id))
        last = step is steps[-1] or steps[steps.index(step) + 1].recipe is not r
        if last and "ready" in r.attrs:
            checks = []
            for item in r.attrs["ready"].split():
                if item.startswith("/"):
                    checks.append("[ -S %s ]" % shell_word(item))
                else:
                    host, port = item.rsplit(":", 1)
                    checks.append("(exec 3<>/dev/tcp/%s/%s) 2>/dev/null" % (host, port))
            test = " && ".join(checks)
            out.append("start=$SECONDS; until %s; do [ $((SECONDS - start)) -ge %d ] && break; "
                       "sleep 0.2; done; %s; record %s $? $((SECONDS - start))"
                       % (test, WAIT_SECONDS, test, shell_word(r.name + ".ready")))
            # What the recipes found: the configuration's policies, checked again at the end.
            out.append("clients/python/kvmictl policies --json >$work/policies.before "
                       "2>$work/policies.before.err")
    out.append("clients/python/kvmictl policies --json >$work/policies.after "
               "2>$work/policies.after.err")
    out.append(EPILOGUE)
    return "\n".join(out) + "\n"


def load_kvmictl():
    path = os.path.join(REPO, "clients", "python", "kvmictl")
    sys.path.insert(0, os.path.dirname(path))
    loader = importlib.machinery.SourceFileLoader("kvmictl", path)
    spec = importlib.util.spec_from_loader("kvmictl", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def repository_tree(root):
    """A directory shaped like the repository from the runfiles, where the recipes run. Every
    file is a copy, never a link: the runfiles link to the source tree and to Bazel's output
    base, which may be under /tmp (a clone in /tmp, as CI's may be), and the recipes' namespace
    replaces /tmp with an empty tmpfs."""
    for sub in ("clients", "scripts", "proto", "daemon/config/examples"):
        shutil.copytree(os.path.join(REPO, sub), os.path.join(root, sub), symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(os.path.join(REPO, "README.md"), os.path.join(root, "README.md"))
    for binary in ("daemon/kvmid", "kernel/sim/kvmi-sim"):
        os.makedirs(os.path.dirname(os.path.join(root, "bazel-bin", binary)), exist_ok=True)
        shutil.copy2(os.path.join(REPO, binary), os.path.join(root, "bazel-bin", binary))


class ReadmeMarkersTest(unittest.TestCase):
    """The markers themselves (no daemon): every block marked, the runner's parsing."""

    def test_every_block_is_marked(self):
        with open(README) as f:
            recipes, problems = parse_readme(f.read())
        self.assertEqual(problems, [])
        runs = {r.run for r in recipes}
        self.assertTrue({"sh", "python"} <= runs, runs)

    def test_an_unmarked_block_is_named(self):
        text = ("<!-- recipe: a -->\n```sh\necho a\n```\n\ntext\n\n```python\nprint(1)\n```\n"
                "<!-- recipe: b run=manual -->\n```sh\nx\n```\n")
        recipes, problems = parse_readme(text)
        self.assertEqual([r.name for r in recipes], ["a", "b"])
        self.assertEqual(len(problems), 2, problems)
        self.assertIn("README.md:8: a ```python block without", problems[0])
        self.assertIn("run=manual needs why", problems[1])

    def test_commands_and_tags(self):
        code = ("# a comment\nc=/tmp/x\nfoo --a \\\n    --b   # (exit 32 or 8)\n"
                "                # a comment line\nbar   # (Ctrl-C stops)\n"
                "baz  # (runs until stopped)\nexport A=1 B=2\nx=$(date)\n")
        r = Recipe("r", {"stream": "3"}, "sh", code, 1)
        steps = plan([r])
        self.assertEqual([(s.mode, s.statuses) for s in steps],
                         [("set", {0}), ("fg", {32, 8}), ("stream", {0}), ("daemon", {0}),
                          ("set", {0}), ("fg", {0})])
        self.assertEqual(steps[1].text, "foo --a \\\n    --b   # (exit 32 or 8)")
        self.assertEqual(steps[2].limit, 3)


class ReadmeRecipesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(README) as f:
            cls.recipes, cls.problems = parse_readme(f.read())
        cls.steps = plan(cls.recipes)
        cls.work = tempfile.mkdtemp(prefix="recipes-", dir=os.environ.get("TEST_TMPDIR"))
        for top in ("/tmp/", "/run/", "/opt/", "/var/lib/"):
            if (cls.work + "/").startswith(top):
                raise AssertionError("the work directory %s is under %s, which the recipes' "
                                     "namespace replaces" % (cls.work, top))
        for sub in ("ovl", "out", "recipes", "bin", "root"):
            os.makedirs(os.path.join(cls.work, sub))
        root = os.path.join(cls.work, "root")
        repository_tree(root)
        shutil.copy2(os.path.join(HERE, "grpcurl_shim.py"), os.path.join(cls.work, "bin", "grpcurl"))
        for step in cls.steps:
            if step.id.endswith(".py"):
                with open(os.path.join(cls.work, "recipes", step.id), "w") as f:
                    f.write(step.text)
        program = os.path.join(cls.work, "run.sh")
        with open(program, "w") as f:
            f.write(script(cls.steps, cls.work))
        budget = sum(s.limit + 10 for s in cls.steps) + 4 * WAIT_SECONDS
        # A pid namespace too: when the test ends, however it ends, nothing started in there
        # (kvmid, the guests, a stream) outlives it.
        cls.process = subprocess.run(
            ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
             "--", "bash", program, cls.work, root],
            capture_output=True, text=True, timeout=budget)
        cls.results = {}
        path = os.path.join(cls.work, "results")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    ident, status, seconds = line.split()
                    cls.results[ident] = (int(status), int(seconds))

    @classmethod
    def tearDownClass(cls):
        # Each command's output and status for the test's outputs (outputs.zip), then cleaned.
        keep = os.environ.get("TEST_UNDECLARED_OUTPUTS_DIR")
        if keep:
            shutil.copytree(os.path.join(cls.work, "out"), os.path.join(keep, "recipes"),
                            dirs_exist_ok=True)
            for name in ("results", "run.sh"):
                if os.path.exists(os.path.join(cls.work, name)):
                    shutil.copy(os.path.join(cls.work, name), keep)
        shutil.rmtree(cls.work, ignore_errors=True)

    def output(self, ident, which="out"):
        path = os.path.join(self.work, "out", "%s.%s" % (ident, which))
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()

    def describe(self, step):
        return "%s (README.md:%d, %s):\n%s\n-- stdout:\n%s\n-- stderr:\n%s" % (
            step.id, step.recipe.line, step.mode, step.text, self.output(step.id)[-3000:],
            self.output(step.id, "err")[-3000:])

    def test_runner_ran(self):
        self.assertEqual(self.process.returncode, 0,
                         self.process.stdout[-3000:] + self.process.stderr[-3000:])
        self.assertEqual(self.problems, [])

    def test_every_recipe(self):
        for recipe in self.recipes:
            with self.subTest(recipe=recipe.name):
                if recipe.run == "manual":
                    self.skipTest("not run: %s" % recipe.attrs["why"])
                if recipe.run == "output":
                    self.check_output(recipe)
                    continue
                for ident in (recipe.name + ".wait", recipe.name + ".ready"):
                    if ident in self.results:
                        self.assertEqual(self.results[ident][0], 0,
                                         "%s (README.md:%d) never succeeded: %s" % (
                                             ident, recipe.line, recipe.attrs))
                steps = [s for s in self.steps if s.recipe is recipe]
                self.assertTrue(steps, "%s has no command" % recipe.name)
                stdout = ""
                for step in steps:
                    self.check_step(step)
                    stdout += self.output(step.id)
                if "expect" in recipe.attrs:
                    self.assertRegex(stdout, re.compile(recipe.attrs["expect"], re.M),
                                     "%s: output" % recipe.name)

    def check_step(self, step):
        self.assertIn(step.id, self.results, "did not run: " + self.describe(step))
        status, _ = self.results[step.id]
        err = self.output(step.id, "err")
        if step.mode == "stream":
            # Still running when Ctrl-C came (timeout's 124), and it had printed something.
            self.assertEqual(status, 124, "ended before Ctrl-C, or ignored it: " +
                             self.describe(step))
            self.assertTrue(self.output(step.id).strip(), "printed nothing: " +
                            self.describe(step))
            tracebacks = err.count("Traceback")
            self.assertEqual(tracebacks, err.count("\nKeyboardInterrupt"),
                             "failed: " + self.describe(step))
        else:
            self.assertIn(status, step.statuses, "exit %d: %s" % (status, self.describe(step)))
            self.assertNotIn("Traceback", err, self.describe(step))

    def check_output(self, recipe):
        """Sample output of kvmictl events: its header and columns as kvmictl prints them."""
        self.assertEqual(recipe.attrs.get("of"), "kvmictl events")
        ctl = load_kvmictl()
        lines = [l for l in recipe.code.splitlines() if l.strip()]
        header = lines[0]
        self.assertEqual([h.strip() for h in re.split(r"\s{2,}", header)], ctl.EVENT_COLUMNS)
        starts = [header.index(h) for h in ctl.EVENT_COLUMNS]
        verdicts = {ctl.kc.action_name(v) + kept for v in ctl.kc.policy_pb.Action.values()
                    for kept in ("", " (old value kept)")}
        for line in lines[1:]:
            for start in starts[1:]:  # two spaces before every column: nothing spills
                self.assertEqual(line[start - 2:start], "  ", "%r at %d" % (line, start))
            verdict = line[starts[ctl.EVENT_COLUMNS.index("VERDICT")]:
                           starts[ctl.EVENT_COLUMNS.index("DECIDED BY")]].strip()
            self.assertIn(verdict, verdicts, line)

    def test_daemons_stop_cleanly(self):
        for step in [s for s in self.steps if s.mode == "daemon"]:
            with self.subTest(step=step.id):
                self.assertIn(step.id, self.results, self.describe(step))
                self.assertEqual(self.results[step.id][0], 0, "exit status after SIGTERM: " +
                                 self.describe(step))

    def test_no_recipe_weakens_a_baseline_protection(self):
        def policies(which):
            path = os.path.join(self.work, "policies." + which)
            self.assertTrue(os.path.exists(path), "no policy list " + which)
            with open(path) as f:
                listed = [json.loads(line)["policy"] for line in f if line.strip()]
            return {p["name"]: p for p in listed}
        before, after = policies("before"), policies("after")
        self.assertTrue(before, "no policies when the guests came up")
        for name, policy in before.items():
            self.assertIn(name, after, "a recipe deleted the configuration's policy %s" % name)
            self.assertEqual(after[name], policy, "a recipe changed the policy %s" % name)


if __name__ == "__main__":
    unittest.main()
