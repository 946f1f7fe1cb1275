#!/usr/bin/python3
"""A stand-in for grpcurl (not packaged for Debian 12) in the README recipe test: the grpcurl
command lines of README.md run as written, with this program first on PATH as `grpcurl`.

It takes the grpcurl flags the README uses (-cacert, -cert, -key, -d, -max-time, -plaintext, -unix)
and its verbs (`list`, `list SERVICE`, `describe SYMBOL`, a method call) and does the same: `list`
and method calls with `buf curl` (installed by scripts/setup.sh), which reads the schema from
kvmid's server reflection as grpcurl does; `describe` (which buf curl lacks) and `list SERVICE`
ask server reflection themselves, from Python. Exit status as grpcurl's: 64 + the gRPC status
code of a failed call (buf curl's is the code shifted left by 3), 2 for a command line it does
not understand.

  grpcurl_shim.py [grpcurl flags] ADDRESS [list [SERVICE] | describe SYMBOL | METHOD]
"""

import os
import shutil
import subprocess
import sys
import tempfile

BUF = os.environ.get("BUF", "/opt/kvmid-tools/node_modules/.bin/buf")
REFLECTION_PROTO = "/usr/share/grpc-proto/grpc/reflection/v1alpha/reflection.proto"
STATUS_OFFSET = 64  # grpcurl: exit 64 + code when the RPC fails
VALUE_FLAGS = {"-cacert", "-cert", "-key", "-d", "-max-time", "-import-path", "-proto",
               "-servername", "-authority"}
BOOL_FLAGS = {"-plaintext", "-unix", "-insecure"}


def usage(message):
    print("grpcurl (shim): %s" % message, file=sys.stderr)
    sys.exit(2)


def parse(argv):
    flags, words = {}, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and len(a) > 2:
            a = a[1:]  # grpcurl takes -flag and --flag alike
        if a.startswith("-") and "=" in a:
            a, value = a.split("=", 1)
            flags[a] = value
        elif a in VALUE_FLAGS:
            if i + 1 >= len(argv):
                usage("%s needs a value" % a)
            flags[a] = argv[i + 1]
            i += 1
        elif a in BOOL_FLAGS:
            flags[a] = True
        elif a.startswith("-"):
            usage("flag %s is not supported by this stand-in" % a)
        else:
            words.append(a)
        i += 1
    if not words:
        usage("no address")
    return flags, words[0], words[1:]


def buf_base(flags, address):
    """buf curl's arguments for the transport, and the URL prefix."""
    args = [BUF, "curl", "--protocol", "grpc"]
    if flags.get("-unix"):
        args += ["--http2-prior-knowledge", "--unix-socket", address]
        return args, "http://localhost"
    if flags.get("-plaintext"):
        return args + ["--http2-prior-knowledge"], "http://" + address
    for flag in ("-cacert", "-cert", "-key"):
        if flag in flags:
            args += ["--" + flag[1:], flags[flag]]
    if flags.get("-servername"):
        usage("-servername is not supported by this stand-in")
    return args, "https://" + address


def exit_status(buf_status):
    if buf_status > 0 and buf_status % 8 == 0:
        return STATUS_OFFSET + buf_status // 8
    return buf_status


def run_buf(args):
    return exit_status(subprocess.run(args).returncode)


# ---- describe: server reflection from Python ----------------------------------------------------

def reflection_module(tmp):
    """grpc.reflection.v1alpha's messages, generated with protoc (Debian has the .proto, not the
    Python package grpcio-reflection)."""
    shutil.copy(REFLECTION_PROTO, os.path.join(tmp, "reflection_alpha.proto"))
    subprocess.run(["protoc", "-I" + tmp, "--python_out=" + tmp, "reflection_alpha.proto"],
                   check=True)
    sys.path.insert(0, tmp)
    import reflection_alpha_pb2  # noqa: E402
    return reflection_alpha_pb2


def channel_for(flags, address):
    import grpc
    if flags.get("-unix"):
        return grpc.insecure_channel("unix:" + address)
    if flags.get("-plaintext"):
        return grpc.insecure_channel(address)

    def read(flag):
        if flag not in flags:
            return None
        with open(flags[flag], "rb") as f:
            return f.read()
    credentials = grpc.ssl_channel_credentials(read("-cacert"), read("-key"), read("-cert"))
    return grpc.secure_channel(address, credentials)


SCALARS = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
           7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32",
           16: "sfixed64", 17: "sint32", 18: "sint64"}


def field_line(field):
    if field.message_type is not None:
        kind = "." + field.message_type.full_name
    elif field.enum_type is not None:
        kind = "." + field.enum_type.full_name
    else:
        kind = SCALARS.get(field.type, str(field.type))
    label = "repeated " if field.label == field.LABEL_REPEATED else ""
    return "  %s%s %s = %d;" % (label, kind, field.name, field.number)


def describe(flags, address, symbol, methods_only=False):
    """grpcurl's `describe SYMBOL` (a message, service or enum), or with methods_only its
    `list SERVICE` (Service.Method lines), from server reflection."""
    import grpc
    from google.protobuf import descriptor_pb2, descriptor_pool
    with tempfile.TemporaryDirectory() as tmp:
        r = reflection_module(tmp)
        channel = channel_for(flags, address)
        call = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=r.ServerReflectionRequest.SerializeToString,
            response_deserializer=r.ServerReflectionResponse.FromString)
        try:
            answers = list(call(iter([r.ServerReflectionRequest(file_containing_symbol=symbol)]),
                                timeout=float(flags.get("-max-time", 10))))
        except grpc.RpcError as e:
            print("Failed to resolve symbol %r: %s: %s" % (symbol, e.code().name, e.details()),
                  file=sys.stderr)
            return STATUS_OFFSET + e.code().value[0]
        files = {}
        for answer in answers:
            if answer.HasField("error_response"):
                print("Failed to resolve symbol %r: %s" % (symbol,
                                                           answer.error_response.error_message),
                      file=sys.stderr)
                return STATUS_OFFSET + answer.error_response.error_code
            for blob in answer.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
                files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added = set()

    def add(name):
        if name in added:
            return
        proto = files.get(name)
        if proto is None:  # a well-known type the server did not send: protobuf's own copy
            default = descriptor_pool.Default().FindFileByName(name)
            proto = descriptor_pb2.FileDescriptorProto()
            default.CopyToProto(proto)
        for dependency in proto.dependency:
            add(dependency)
        pool.Add(proto)
        added.add(name)
    for name in files:
        add(name)
    try:
        message = None if methods_only else pool.FindMessageTypeByName(symbol)
    except KeyError:
        message = None
    if message is not None:
        print("%s is a message:" % symbol)
        print("message %s {" % message.name)
        for field in message.fields:
            print(field_line(field))
        print("}")
        return 0
    if methods_only:
        try:
            service = pool.FindServiceByName(symbol)
        except KeyError:
            print("Failed to list methods of %s: not a service" % symbol, file=sys.stderr)
            return 1
        for m in service.methods:
            print(m.full_name)
        return 0
    try:
        service = pool.FindServiceByName(symbol)
        print("%s is a service:" % symbol)
        print("service %s {" % service.name)
        for m in service.methods:
            print("  rpc %s ( %s.%s ) returns ( %s.%s );" % (
                m.name, "stream " if m.client_streaming else "", m.input_type.full_name,
                "stream " if m.server_streaming else "", m.output_type.full_name))
        print("}")
        return 0
    except KeyError:
        pass
    try:
        enum = pool.FindEnumTypeByName(symbol)
        print("%s is an enum:" % symbol)
        print("enum %s {" % enum.name)
        for v in enum.values:
            print("  %s = %d;" % (v.name, v.number))
        print("}")
        return 0
    except KeyError:
        print("Symbol not found: %s" % symbol, file=sys.stderr)
        return 1


def main(argv):
    flags, address, rest = parse(argv)
    if rest and rest[0] == "describe":
        if len(rest) != 2:
            usage("describe takes one symbol")
        return describe(flags, address, rest[1])
    base, url = buf_base(flags, address)
    if "-max-time" in flags:
        base += ["--timeout", "%ss" % flags["-max-time"]]
    if rest and rest[0] == "list":
        if len(rest) == 1:
            return run_buf(base + ["--list-services", url])
        # buf curl --list-methods lists every service, and kvmid's reflection cannot describe
        # grpc.health.v1.Health; grpcurl asks for this one service only, as this does.
        return describe(flags, address, rest[1], methods_only=True)
    if len(rest) != 1:
        usage("expected list, describe or one METHOD, got %r" % rest)
    method = rest[0]
    if "/" not in method:  # Service.Method
        service, _, name = method.rpartition(".")
        method = service + "/" + name
    if "-d" in flags:
        base += ["-d", flags["-d"]]
    return run_buf(base + [url + "/" + method])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
