#!/usr/bin/env python3
"""Writes compile_commands.json (the clang tooling database) for the C++ sources of Bazel
targets, from `bazel aquery`: one entry per CppCompile action, run from Bazel's execution root.
clang-tidy reads it (scripts/tidy.sh). The generated headers (.pb.h) must exist: build the
targets first.

usage: scripts/compile_commands.py OUT.json TARGET_PATTERN...
"""
import json
import subprocess
import sys


GCC_ONLY = {"-fno-canonical-system-headers", "-MD", "-Wno-free-nonheap-object",
            "-Wunused-but-set-parameter"}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, patterns = sys.argv[1], sys.argv[2:]
    query = 'mnemonic("CppCompile", deps(%s))' % " + ".join(patterns)
    text = subprocess.run(
        ["bazel", "aquery", "--output=jsonproto", "--include_artifacts=false", query],
        check=True, capture_output=True, text=True).stdout
    actions = json.loads(text).get("actions", [])
    root = subprocess.run(["bazel", "info", "execution_root"], check=True, capture_output=True,
                          text=True).stdout.strip()
    entries = []
    seen = set()
    for action in actions:
        args = action["arguments"]
        try:
            source = args[args.index("-c") + 1]
        except (ValueError, IndexError):
            continue
        # The project's own sources only (not external repositories), one entry each.
        if source.startswith(("external/", "bazel-out/")) or source in seen:
            continue
        seen.add(source)
        # clang reads gcc's command line but for gcc-only options; the dependency file is not
        # wanted (clang-tidy writes nothing).
        clean = ["clang" if source.endswith(".c") else "clang++"]
        skip = False
        for arg in args[1:]:
            if skip:
                skip = False
            elif arg == "-MF":
                skip = True
            elif arg not in GCC_ONLY:
                clean.append(arg)
        entries.append({"directory": root, "file": source, "arguments": clean})
    with open(out, "w") as f:
        json.dump(entries, f, indent=1)
    print("%s: %d sources" % (out, len(entries)))


if __name__ == "__main__":
    main()
