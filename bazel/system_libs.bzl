"""Repository rule exposing Debian system libraries as cc_library targets.

Flags come from pkg-config at fetch time (no downloads). Headers live in
/usr/include, which the auto-configured C++ toolchain already treats as a
built-in include directory, so no hdrs are needed.
"""

# target name -> (pkg-config modules, extra linkopts)
_LIBS = {
    "grpc++": (["grpc++"], []),
    # No .pc file ships for grpc++_reflection; it is a plain -l.
    "grpc++_reflection": (["grpc++"], ["-lgrpc++_reflection"]),
    "protobuf": (["protobuf"], []),
    "absl": (["absl_strings", "absl_str_format", "absl_synchronization", "absl_time", "absl_status",
              "absl_statusor", "absl_flags", "absl_flags_parse", "absl_hash", "absl_raw_hash_set",
              "absl_random_random"], []),
    "spdlog": (["spdlog"], []),
    "gtest": (["gtest"], []),
    "gmock": (["gmock"], []),
    "gmock_main": (["gmock_main"], []),
    "benchmark": (["benchmark"], []),
    "crypto": (["libcrypto"], []),
    # prometheus-cpp (Debian prometheus-cpp-dev): metrics types and the pull exposer, whose HTTP
    # server is civetweb (Debian libcivetweb-dev, which ships no .pc file: plain -l). kvmid
    # includes civetweb.h itself for /healthz and /readyz on the exposer's port.
    "prometheus": (["prometheus-cpp-pull", "prometheus-cpp-core"], []),
    "civetweb": ([], ["-lcivetweb-cpp", "-lcivetweb"]),
}

def _pkg_config(rctx, args):
    res = rctx.execute(["pkg-config"] + args)
    if res.return_code != 0:
        fail("pkg-config %s failed: %s" % (" ".join(args), res.stderr))
    # Starlark in Bazel 4 has no whitespace-splitting split().
    return [f for f in res.stdout.replace("\n", " ").replace("\t", " ").split(" ") if f]

def _dedup_keep_last(items):
    seen = {}
    out = []
    for x in reversed(items):
        if x not in seen:
            seen[x] = True
            out.append(x)
    return list(reversed(out))

def _system_libs_impl(rctx):
    if not rctx.which("pkg-config"):
        fail("pkg-config not found: apt-get install pkg-config")
    lines = ['package(default_visibility = ["//visibility:public"])', ""]
    for name, (mods, extra) in _LIBS.items():
        libs = _pkg_config(rctx, ["--libs"] + mods) if mods else []
        cflags = _pkg_config(rctx, ["--cflags"] + mods) if mods else []
        defines = [f[2:] for f in cflags if f.startswith("-D")]
        linkopts = _dedup_keep_last(extra + libs)
        lines.append("cc_library(")
        lines.append("    name = %r," % name)
        lines.append("    defines = %r," % defines)
        lines.append("    linkopts = %r," % linkopts)
        lines.append(")")
        lines.append("")
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD.bazel", "\n".join(lines))

system_libs = repository_rule(
    implementation = _system_libs_impl,
    environ = ["PKG_CONFIG_PATH"],
    local = True,
)
