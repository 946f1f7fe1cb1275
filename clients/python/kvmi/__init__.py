"""Python bindings of kvmid's gRPC API; the generated modules live in kvmi.v1."""
