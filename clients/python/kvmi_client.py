"""A small, idiomatic wrapper around kvmid's gRPC API (kvmi.v1.Introspection).

    from kvmi_client import Client, event_filter

    with Client("unix:/run/kvmid/api.sock") as kvmi:
        for vm in kvmi.list_vms():
            print(vm.name, state_name(vm.state))
        for item in kvmi.events(allow=event_filter(vms=["sim-vm-0"], events=["MSR"])):
            if isinstance(item, Dropped):
                print("missed", item.dropped)
            else:
                print(item.vm_name, item.msr.msr, action_name(item.action))

Every failed call raises KvmiError (or a subclass) carrying the gRPC status code and the server's
message, which names the offending field for INVALID_ARGUMENT. A daemon that cannot be reached
raises Unreachable before any call is attempted, so callers can tell "kvmid is down" apart from
"the guest is gone" (both are UNAVAILABLE on the wire).

The generated modules (kvmi/v1/*_pb2*.py) come from gen_protos.sh; they are not committed.
"""

import collections
import json
import re
import threading

import grpc
from google.protobuf import json_format, text_format

try:
    from kvmi.v1 import introspection_pb2 as pb
    from kvmi.v1 import introspection_pb2_grpc as pb_grpc
    from kvmi.v1 import policy_pb2 as policy_pb
except ImportError as e:  # pragma: no cover - depends on the checkout
    raise ImportError(
        "kvmi_client: the generated modules kvmi/v1/*_pb2.py are missing (%s); run "
        "clients/python/gen_protos.sh (needs protobuf-compiler and protobuf-compiler-grpc)" % e
    ) from e

__all__ = [
    "Client", "KvmiError", "NotFound", "InvalidArgument", "FailedPrecondition", "Unavailable",
    "Unreachable", "EventsDropped", "Dropped", "event_filter", "parse_policy", "policy_to_text",
    "protect_pages_policy", "event_type", "event_type_name", "action_name", "state_name",
    "mode_name", "parse_range", "parse_int", "pb", "policy_pb",
]

DEFAULT_TARGET = "unix:/run/kvmid/api.sock"


# ---- errors -----------------------------------------------------------------------------------

class KvmiError(Exception):
    """A failed API call: `code` is the grpc.StatusCode, `message` the server's details."""

    def __init__(self, code, message):
        super().__init__("%s: %s" % (code.name, message))
        self.code = code
        self.message = message


class NotFound(KvmiError):
    pass


class InvalidArgument(KvmiError):
    pass


class FailedPrecondition(KvmiError):
    pass


class Unavailable(KvmiError):
    pass


class Unreachable(Unavailable):
    """No connection to kvmid at all (as opposed to a call that reached it)."""


class EventsDropped(KvmiError):
    """Raised by a stream opened with drops="raise" when kvmid reports lost events."""

    def __init__(self, dropped, dropped_total):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         "stream lost %d events (%d in total): the reader is slower than the guests"
                         % (dropped, dropped_total))
        self.dropped = dropped
        self.dropped_total = dropped_total


_ERROR_CLASSES = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _wrap(error):
    """grpc.RpcError -> KvmiError subclass (keeps the status code and message)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return _ERROR_CLASSES.get(code, KvmiError)(code, details or "")


# ---- enums and parsing helpers -----------------------------------------------------------------

def _enum_name(enum, prefix, value):
    try:
        name = enum.Name(value)
    except ValueError:
        return str(value)
    return name[len(prefix):] if name.startswith(prefix) else name


def event_type_name(value):
    """EVENT_CR (2) -> "CR"."""
    return _enum_name(policy_pb.EventType, "EVENT_", value)


def action_name(value):
    """ACTION_KEEP_OLD -> "KEEP_OLD"."""
    return _enum_name(policy_pb.Action, "ACTION_", value)


def state_name(value):
    """VM_STATE_HOOKED -> "HOOKED"."""
    return _enum_name(pb.VMState, "VM_STATE_", value)


def mode_name(value):
    return _enum_name(policy_pb.Mode, "MODE_", value)


def event_type(value):
    """"cr", "EVENT_CR", "2" or 2 -> policy_pb.EVENT_CR. Raises ValueError for anything else."""
    if isinstance(value, int):
        if value not in policy_pb.EventType.values():
            raise ValueError("unknown event type %d" % value)
        return value
    text = str(value).strip()
    if text.isdigit():
        return event_type(int(text))
    name = text.upper().replace("-", "_")
    if not name.startswith("EVENT_"):
        name = "EVENT_" + name
    try:
        return policy_pb.EventType.Value(name)
    except ValueError:
        known = ", ".join(event_type_name(v) for v in policy_pb.EventType.values() if v)
        raise ValueError("unknown event type '%s' (one of: %s)" % (value, known)) from None


def parse_int(text):
    """Decimal or 0x-hex (the way GPAs, MSRs and CRs are written)."""
    if isinstance(text, int):
        return text
    try:
        return int(str(text).strip().replace("_", ""), 0)
    except ValueError:
        raise ValueError("'%s' is not a number (decimal or 0x hex)" % text) from None


def parse_range(text):
    """"0x1000-0x1fff" -> (0x1000, 0x1fff); "0x1000" -> (0x1000, 0x1000); "0x1000+0x1000" ->
    (0x1000, 0x1fff). Inclusive, as the API's gpa_first/gpa_last are."""
    text = str(text).strip()
    if "+" in text:
        first, size = text.split("+", 1)
        first, size = parse_int(first), parse_int(size)
        if size <= 0:
            raise ValueError("'%s': the size after '+' must be positive" % text)
        return first, first + size - 1
    if "-" in text:
        first, last = text.split("-", 1)
        first, last = parse_int(first), parse_int(last)
    else:
        first = last = parse_int(text)
    if first > last:
        raise ValueError("'%s': the range's first address is above its last" % text)
    return first, last


def event_filter(vms=(), events=(), vcpus=(), crs=(), msrs=(), gpa=None, access=""):
    """Builds an EventFilter. `events` takes names ("cr", "PF") or EventType values; `gpa` an
    inclusive (first, last) pair or a range string; empty fields match everything."""
    f = pb.EventFilter()
    f.vms.extend(vms)
    f.events.extend(event_type(e) for e in events)
    f.vcpus.extend(int(v) for v in vcpus)
    f.crs.extend(parse_int(c) for c in crs)
    f.msrs.extend(parse_int(m) for m in msrs)
    if gpa is not None:
        first, last = parse_range(gpa) if isinstance(gpa, str) else gpa
        if first is not None:
            f.gpa_first = first
        if last is not None:
            f.gpa_last = last
    f.access = access or ""
    return f


# "policy { ... }" (an ApplyPolicyRequest), after any leading '#' comment lines.
_WRAPPED_TEXT = re.compile(r"\A(?:\s*#[^\n]*\n)*\s*policy\s*[:{<]")


def parse_policy(text):
    """A Policy from protobuf text format or JSON (proto3 JSON mapping; a leading '{' says
    JSON). Both may also wrap it as an ApplyPolicyRequest ({"policy": {...}} / policy { ... }).
    Raises ValueError with the parser's message on a malformed file."""
    stripped = text.lstrip()
    try:
        if stripped.startswith("{"):
            data = json.loads(text)
            if isinstance(data, dict) and set(data) == {"policy"}:
                data = data["policy"]
            return json_format.ParseDict(data, policy_pb.Policy())
        if _WRAPPED_TEXT.match(text):
            return text_format.Parse(text, pb.ApplyPolicyRequest()).policy
        return text_format.Parse(text, policy_pb.Policy())
    except (json.JSONDecodeError, json_format.ParseError, text_format.ParseError) as e:
        raise ValueError(str(e)) from None


def policy_to_text(policy):
    return text_format.MessageToString(policy, as_one_line=True)


def protect_pages_policy(name, gpa_first, gpa_last, allowed="rx", vms=(), monitor=False,
                         action=None, description=""):
    """A protect_pages Policy: pages [gpa_first, gpa_last] keep only `allowed` access. `vms`
    selects guests by name (prefixes ending in '*') or UUID; empty = every guest. `monitor`
    only counts and reports violations instead of enforcing them."""
    policy = policy_pb.Policy(name=name, description=description)
    policy.protect_pages.gpa_first = gpa_first
    policy.protect_pages.gpa_last = gpa_last
    policy.protect_pages.allowed = allowed
    policy.mode = policy_pb.MODE_MONITOR if monitor else policy_pb.MODE_ENFORCE
    if action is not None:
        policy.action = action
    for vm in vms:
        # A UUID has the 8-4-4-4-12 shape; anything else is a name (or a name prefix).
        if len(vm) == 36 and vm.count("-") == 4:
            policy.guests.uuids.append(vm)
        else:
            policy.guests.names.append(vm)
    return policy


# ---- streams -----------------------------------------------------------------------------------

Dropped = collections.namedtuple("Dropped", "dropped dropped_total")
Dropped.__doc__ = "Events a stream lost since the previous notice (and since it started)."


class EventStream:
    """Iterator over StreamEvents: yields kvmi.v1.Event messages and, with drops="yield" (the
    default), Dropped notices in between. `dropped_total` counts what was lost so far whatever
    the mode. cancel() (or leaving a `with` block) ends the stream from any thread."""

    def __init__(self, call, drops):
        self._call = call
        self._drops = drops
        self.dropped_total = 0

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                    raise StopIteration from None  # we asked for it
                raise _wrap(e) from None
            if message.HasField("event"):
                return message.event
            notice = message.dropped
            self.dropped_total = notice.dropped_total
            if self._drops == "raise":
                raise EventsDropped(notice.dropped, notice.dropped_total)
            if self._drops == "yield":
                return Dropped(notice.dropped, notice.dropped_total)
            # "ignore": counted in dropped_total only

    def cancel(self):
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()
        return False


# ---- the client --------------------------------------------------------------------------------

class Client:
    """A connection to kvmid. `target` is a gRPC target: "unix:/path", "host:port", or a bare
    absolute path (taken as a UNIX socket). `timeout` bounds each unary call (seconds);
    `connect_timeout` how long to wait for the daemon before raising Unreachable."""

    def __init__(self, target=DEFAULT_TARGET, timeout=10.0, connect_timeout=3.0):
        if target.startswith("/"):
            target = "unix:" + target
        self.target = target
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.IntrospectionStub(self._channel)
        self._ready = False
        self._lock = threading.Lock()

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _connect(self):
        # Checked once, so "daemon down" fails fast with a clear error instead of surfacing as
        # an UNAVAILABLE that could also mean "guest gone".
        with self._lock:
            if self._ready:
                return
            try:
                grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
            except grpc.FutureTimeoutError:
                raise Unreachable(grpc.StatusCode.UNAVAILABLE,
                                  "cannot connect to kvmid at %s within %gs"
                                  % (self.target, self.connect_timeout)) from None
            self._ready = True

    def _unary(self, method, request):
        self._connect()
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _wrap(e) from None

    # Guests.
    def list_vms(self):
        """Every guest kvmid has seen since it started: a list of kvmi.v1.VM."""
        return list(self._unary("ListVMs", pb.ListVMsRequest()).vms)

    def get_vm(self, vm):
        """One guest by UUID or name (NotFound if kvmid never saw it)."""
        return self._unary("GetVM", pb.GetVMRequest(vm=vm))

    # Events.
    def events(self, allow=None, deny=None, registers=False, max_queue=0, drops="yield"):
        """Opens StreamEvents. `allow`/`deny` are EventFilters (see event_filter) or None;
        `drops` is "yield" (Dropped items in the stream), "raise" (EventsDropped) or "ignore".
        A bad filter raises InvalidArgument on the first iteration (that is when the server
        answers). Returns an EventStream."""
        if drops not in ("yield", "raise", "ignore"):
            raise ValueError("drops must be 'yield', 'raise' or 'ignore'")
        request = pb.StreamEventsRequest(include_registers=registers, max_queue=max_queue)
        if allow is not None:
            request.allow.CopyFrom(allow)
        if deny is not None:
            request.deny.CopyFrom(deny)
        self._connect()
        return EventStream(self._stub.StreamEvents(request), drops)

    # Policies.
    def apply_policy(self, policy):
        """Applies (or replaces, by name) a policy: a policy_pb.Policy, a dict in the JSON
        mapping, or protobuf text / JSON text. Returns True if it replaced one."""
        if isinstance(policy, str):
            policy = parse_policy(policy)
        elif isinstance(policy, dict):
            policy = json_format.ParseDict(policy, policy_pb.Policy())
        return self._unary("ApplyPolicy", pb.ApplyPolicyRequest(policy=policy)).replaced

    def policies(self):
        """Every policy with its counters: a list of kvmi.v1.PolicyStatus."""
        return list(self._unary("ListPolicies", pb.ListPoliciesRequest()).policies)

    def delete_policy(self, name):
        self._unary("DeletePolicy", pb.DeletePolicyRequest(name=name))

    # Control (served by kvmid builds that implement them; older ones answer UNIMPLEMENTED).
    def get_registers(self, vm, vcpu, msrs=()):
        """A vCPU's registers (and the MSRs asked for): kvmi.v1.GetRegistersResponse."""
        return self._unary("GetRegisters", pb.GetRegistersRequest(
            vm=vm, vcpu=vcpu, msrs=[parse_int(m) for m in msrs]))

    def read_physical(self, vm, gpa, size):
        """`size` bytes of guest physical memory at `gpa`, as bytes."""
        return self._unary("ReadPhysical", pb.ReadPhysicalRequest(vm=vm, gpa=gpa, size=size)).data

    def write_physical(self, vm, gpa, data):
        self._unary("WritePhysical", pb.WritePhysicalRequest(vm=vm, gpa=gpa, data=bytes(data)))

    def pause(self, vm, vcpu=None):
        """Pauses one vCPU (or every vCPU); returns the indexes paused."""
        request = pb.PauseVCPURequest(vm=vm)
        if vcpu is not None:
            request.vcpu = vcpu
        return list(self._unary("PauseVCPU", request).paused)

    def resume(self, vm, vcpu=None):
        """Resumes one vCPU (or every vCPU this API paused); returns the indexes resumed."""
        request = pb.ResumeVCPURequest(vm=vm)
        if vcpu is not None:
            request.vcpu = vcpu
        return list(self._unary("ResumeVCPU", request).resumed)
