#include "daemon/api/introspection_service.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <set>

#include "daemon/config/policy_convert.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using grpc::Status;
using grpc::StatusCode;

Status Invalid(const std::string& field, const std::string& why) {
  return Status(StatusCode::INVALID_ARGUMENT, field + ": " + why);
}

kvmi::v1::VMState ToProto(GuestState state, bool all_paused) {
  switch (state) {
    case GuestState::kHandshaking:
      return kvmi::v1::VM_STATE_HANDSHAKING;
    case GuestState::kHooked:
      return all_paused ? kvmi::v1::VM_STATE_PAUSED : kvmi::v1::VM_STATE_HOOKED;
    case GuestState::kUnhooking:
      return kvmi::v1::VM_STATE_UNHOOKING;
    case GuestState::kGone:
      return kvmi::v1::VM_STATE_GONE;
  }
  return kvmi::v1::VM_STATE_UNSPECIFIED;
}

// An EventFilter, validated once and matched on the loop thread.
struct CompiledFilter {
  std::vector<std::string> vms;
  std::set<uint8_t> events;
  std::set<uint32_t> vcpus, crs, msrs;
  std::optional<uint64_t> gpa_first, gpa_last;
  uint8_t access = 0;
  bool empty = true;

  bool Matches(const ObservedEvent& o) const {
    if (empty) return false;
    const kvmi::Event& e = o.event;
    if (!vms.empty()) {
      std::shared_ptr<const GuestView> view = o.guest->cached_view();
      std::string uuid = view ? kvmi::UuidToString(view->uuid) : o.guest->key();
      std::string name = view ? view->name : "";
      bool hit = false;
      for (const std::string& vm : vms)
        hit = hit || vm == uuid || vm == name || vm == o.guest->key();
      if (!hit) return false;
    }
    if (!events.empty() && events.count(e.id()) == 0) return false;
    if (!vcpus.empty() && vcpus.count(e.vcpu()) == 0) return false;
    if (!crs.empty() && (e.id() != KVMI_EVENT_CR || crs.count(e.specific.cr.cr) == 0)) return false;
    if (!msrs.empty() && (e.id() != KVMI_EVENT_MSR || msrs.count(e.specific.msr.msr) == 0)) {
      return false;
    }
    if (gpa_first || gpa_last || access != 0) {
      if (e.id() != KVMI_EVENT_PF) return false;
      if (gpa_first && e.specific.pf.gpa < *gpa_first) return false;
      if (gpa_last && e.specific.pf.gpa > *gpa_last) return false;
      if (access != 0 && (e.specific.pf.access & access) == 0) return false;
    }
    return true;
  }
};

Status Compile(const kvmi::v1::EventFilter& f, const std::string& field, CompiledFilter* out) {
  out->vms.assign(f.vms().begin(), f.vms().end());
  for (int i = 0; i < f.events_size(); ++i) {
    uint8_t id;
    if (!FromEventType(f.events(i), &id)) {
      return Invalid(field + ".events[" + std::to_string(i) + "]", "unknown event type");
    }
    out->events.insert(id);
  }
  for (uint32_t v : f.vcpus()) {
    if (v > 0xffff) return Invalid(field + ".vcpus", std::to_string(v) + " is not a vCPU index");
    out->vcpus.insert(v);
  }
  out->crs.insert(f.crs().begin(), f.crs().end());
  out->msrs.insert(f.msrs().begin(), f.msrs().end());
  if (f.has_gpa_first()) out->gpa_first = f.gpa_first();
  if (f.has_gpa_last()) out->gpa_last = f.gpa_last();
  if (out->gpa_first && out->gpa_last && *out->gpa_first > *out->gpa_last) {
    return Invalid(field + ".gpa_first", "is above gpa_last");
  }
  if (!ParseAccess(f.access(), &out->access)) {
    return Invalid(field + ".access", "'" + f.access() + "' is not made of r, w, x");
  }
  out->empty = false;
  return Status::OK;
}

// One StreamEvents call's buffer: filled on the guests' loop threads, drained by the RPC.
// Bounded; what does not fit is counted, never waited for.
class StreamQueue {
 public:
  explicit StreamQueue(size_t capacity) : capacity_(capacity) {}

  void Push(const ObservedEvent& o) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (queue_.size() >= capacity_) {
      ++dropped_pending_;
      return;
    }
    queue_.push_back(o);
    cv_.notify_one();
  }
  // Waits up to `wait` for events; returns them and the drops since the last call.
  std::deque<ObservedEvent> Take(std::chrono::milliseconds wait, uint64_t* dropped) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, wait, [&] { return !queue_.empty() || dropped_pending_ > 0; });
    std::deque<ObservedEvent> out;
    out.swap(queue_);
    *dropped = dropped_pending_;
    dropped_pending_ = 0;
    return out;
  }

 private:
  const size_t capacity_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<ObservedEvent> queue_;
  uint64_t dropped_pending_ = 0;
};

kvmi::v1::Action ActionOf(const Verdict& v) {
  if (v.keep_old) return kvmi::v1::ACTION_KEEP_OLD;
  switch (v.action) {
    case KVMI_EVENT_ACTION_CONTINUE:
      return kvmi::v1::ACTION_CONTINUE;
    case KVMI_EVENT_ACTION_RETRY:
      return kvmi::v1::ACTION_RETRY;
    case KVMI_EVENT_ACTION_CRASH:
      return kvmi::v1::ACTION_CRASH;
    default:
      return kvmi::v1::ACTION_UNSPECIFIED;
  }
}

}  // namespace

kvmi::v1::VM ToProto(const GuestSnapshot& s, const std::map<std::string, std::string>& labels) {
  kvmi::v1::VM vm;
  bool zero = true;
  for (uint8_t b : s.identity.uuid) zero = zero && b == 0;
  vm.set_uuid(zero ? "" : kvmi::UuidToString(s.identity.uuid));
  vm.set_name(s.identity.name);
  vm.set_start_time(s.identity.start_time);
  vm.set_transport(s.identity.transport);
  vm.set_state(ToProto(s.state, s.vcpu_count > 0 && s.paused_vcpus.size() == s.vcpu_count));
  vm.set_vcpu_count(s.vcpu_count);
  vm.set_kvmi_version(s.kvmi_version);
  for (uint16_t id = KVMI_FIRST_COMMAND; id < KVMI_NEXT_AVAILABLE_COMMAND; ++id) {
    if (s.allowed_commands & (1u << id)) vm.add_allowed_commands(kvmi::CommandName(id));
  }
  for (uint8_t id = 0; id < KVMI_NUM_EVENTS; ++id) {
    if (s.allowed_events & (1u << id)) vm.add_allowed_events(ToEventType(id));
  }
  vm.set_connections(s.connections);
  vm.set_events(s.events);
  vm.set_fallbacks(s.fallbacks);
  for (const auto& [owner, arming] : s.leases) {
    kvmi::v1::Lease* lease = vm.add_leases();
    lease->set_owner(owner);
    for (uint8_t e : arming.vcpu_events) lease->add_vcpu_events(ToEventType(e));
    for (uint8_t e : arming.vm_events) lease->add_vm_events(ToEventType(e));
    for (uint32_t cr : arming.crs) lease->add_crs(cr);
    for (uint32_t msr : arming.msrs) lease->add_msrs(msr);
    lease->set_restricted_pages(static_cast<uint32_t>(arming.page_access.size()));
  }
  vm.mutable_labels()->insert(labels.begin(), labels.end());
  for (const std::string& e : s.arm_errors) vm.add_arm_errors(e);
  return vm;
}

kvmi::v1::Event ToProto(const ObservedEvent& o, bool include_registers) {
  kvmi::v1::Event out;
  const kvmi::Event& e = o.event;
  out.set_id(o.event_id);
  std::shared_ptr<const GuestView> view = o.guest->cached_view();
  if (view) {
    out.set_vm_uuid(kvmi::UuidToString(view->uuid));
    out.set_vm_name(view->name);
  }
  out.set_vcpu(e.vcpu());
  out.set_type(ToEventType(e.id()));
  out.set_mode(e.common.arch.mode);
  out.set_rip(e.common.arch.regs.rip);
  switch (e.id()) {
    case KVMI_EVENT_CR:
      out.mutable_cr()->set_cr(e.specific.cr.cr);
      out.mutable_cr()->set_old_value(e.specific.cr.old_value);
      out.mutable_cr()->set_new_value(e.specific.cr.new_value);
      break;
    case KVMI_EVENT_MSR:
      out.mutable_msr()->set_msr(e.specific.msr.msr);
      out.mutable_msr()->set_old_value(e.specific.msr.old_value);
      out.mutable_msr()->set_new_value(e.specific.msr.new_value);
      break;
    case KVMI_EVENT_PF:
      out.mutable_pf()->set_gva(e.specific.pf.gva);
      out.mutable_pf()->set_gpa(e.specific.pf.gpa);
      out.mutable_pf()->set_access(AccessLetters(e.specific.pf.access));
      break;
    case KVMI_EVENT_BREAKPOINT:
      out.mutable_breakpoint()->set_gpa(e.specific.breakpoint.gpa);
      out.mutable_breakpoint()->set_insn_len(e.specific.breakpoint.insn_len);
      break;
    case KVMI_EVENT_TRAP:
      out.mutable_trap()->set_vector(e.specific.trap.vector);
      out.mutable_trap()->set_type(e.specific.trap.type);
      out.mutable_trap()->set_error_code(e.specific.trap.error_code);
      out.mutable_trap()->set_cr2(e.specific.trap.cr2);
      break;
    case KVMI_EVENT_DESCRIPTOR:
      out.mutable_descriptor_table()->set_table(e.specific.descriptor.descriptor);
      out.mutable_descriptor_table()->set_write(e.specific.descriptor.write != 0);
      break;
    default:
      break;
  }
  if (kvmi::FindEvent(e.id())->has_reply) {
    out.set_action(ActionOf(o.verdict));
    out.set_kept_old_value(o.verdict.keep_old);
  }
  out.set_decided_by(o.verdict.decided_by);
  for (const std::string& rule : o.monitor_hits) out.add_monitor_hits(rule);
  out.set_latency_ns(static_cast<uint64_t>(o.latency.count()));
  if (include_registers) {
    const kvm_regs& r = e.common.arch.regs;
    const kvm_sregs& sr = e.common.arch.sregs;
    kvmi::v1::Registers* regs = out.mutable_registers();
    regs->set_rax(r.rax), regs->set_rbx(r.rbx), regs->set_rcx(r.rcx), regs->set_rdx(r.rdx);
    regs->set_rsi(r.rsi), regs->set_rdi(r.rdi), regs->set_rsp(r.rsp), regs->set_rbp(r.rbp);
    regs->set_r8(r.r8), regs->set_r9(r.r9), regs->set_r10(r.r10), regs->set_r11(r.r11);
    regs->set_r12(r.r12), regs->set_r13(r.r13), regs->set_r14(r.r14), regs->set_r15(r.r15);
    regs->set_rip(r.rip), regs->set_rflags(r.rflags);
    regs->set_cr0(sr.cr0), regs->set_cr3(sr.cr3), regs->set_cr4(sr.cr4), regs->set_efer(sr.efer);
  }
  return out;
}

Status IntrospectionService::ListVMs(grpc::ServerContext*, const kvmi::v1::ListVMsRequest*,
                                     kvmi::v1::ListVMsResponse* response) {
  for (const auto& guest : daemon_->registry().List()) {
    *response->add_vms() = ToProto(guest->Snapshot(), daemon_->pipeline().ViewOf(*guest)->labels);
  }
  return Status::OK;
}

Status IntrospectionService::GetVM(grpc::ServerContext*, const kvmi::v1::GetVMRequest* request,
                                   kvmi::v1::VM* response) {
  if (request->vm().empty()) return Invalid("vm", "a UUID or name is required");
  std::shared_ptr<Guest> guest = daemon_->registry().Lookup(request->vm());
  if (!guest) return Status(StatusCode::NOT_FOUND, "no guest '" + request->vm() + "'");
  *response = ToProto(guest->Snapshot(), daemon_->pipeline().ViewOf(*guest)->labels);
  return Status::OK;
}

Status IntrospectionService::StreamEvents(grpc::ServerContext* context,
                                          const kvmi::v1::StreamEventsRequest* request,
                                          grpc::ServerWriter<kvmi::v1::EventMessage>* writer) {
  CompiledFilter allow, deny;
  if (request->has_allow()) {
    Status s = Compile(request->allow(), "allow", &allow);
    if (!s.ok()) return s;
  } else {
    allow.empty = false;  // no allow filter: everything
  }
  if (request->has_deny()) {
    Status s = Compile(request->deny(), "deny", &deny);
    if (!s.ok()) return s;
  }
  uint32_t capacity = request->max_queue() == 0 ? 1024 : request->max_queue();
  if (capacity > 65536) return Invalid("max_queue", "at most 65536");
  auto queue = std::make_shared<StreamQueue>(capacity);
  uint64_t observer = daemon_->pipeline().AddObserver([queue, allow, deny](const ObservedEvent& o) {
    if (allow.Matches(o) && !deny.Matches(o)) queue->Push(o);
  });
  uint64_t dropped_total = 0;
  bool open = true;
  while (open && !context->IsCancelled()) {
    uint64_t dropped = 0;
    std::deque<ObservedEvent> batch = queue->Take(std::chrono::milliseconds(200), &dropped);
    if (dropped > 0) {
      dropped_total += dropped;
      kvmi::v1::EventMessage notice;
      notice.mutable_dropped()->set_dropped(dropped);
      notice.mutable_dropped()->set_dropped_total(dropped_total);
      open = writer->Write(notice);
    }
    for (const ObservedEvent& o : batch) {
      if (!open) break;
      kvmi::v1::EventMessage message;
      *message.mutable_event() = ToProto(o, request->include_registers());
      open = writer->Write(message);
    }
  }
  daemon_->pipeline().RemoveObserver(observer);
  return Status::OK;
}

Status IntrospectionService::ApplyPolicy(grpc::ServerContext*,
                                         const kvmi::v1::ApplyPolicyRequest* request,
                                         kvmi::v1::ApplyPolicyResponse* response) {
  if (!request->has_policy()) return Invalid("policy", "required");
  std::shared_ptr<Rule> rule;
  std::string error = PolicyToRule(request->policy(), &rule);
  if (!error.empty()) return Status(StatusCode::INVALID_ARGUMENT, "policy." + error);
  bool existed = false;
  for (const auto& r : *daemon_->policies().rules()) existed = existed || r->name == rule->name;
  error = daemon_->ApplyPolicy(rule);
  if (!error.empty()) return Status(StatusCode::INVALID_ARGUMENT, "policy: " + error);
  response->set_replaced(existed);
  spdlog::info("policy {} {} through the API", rule->name, existed ? "replaced" : "applied");
  return Status::OK;
}

Status IntrospectionService::ListPolicies(grpc::ServerContext*,
                                          const kvmi::v1::ListPoliciesRequest*,
                                          kvmi::v1::ListPoliciesResponse* response) {
  for (const auto& rule : *daemon_->policies().rules()) {
    kvmi::v1::PolicyStatus* status = response->add_policies();
    *status->mutable_policy() = RuleToPolicy(*rule);
    status->mutable_counters()->set_name(rule->name);
    status->mutable_counters()->set_hits(rule->hits.load());
    status->mutable_counters()->set_enforced(rule->enforced.load());
  }
  return Status::OK;
}

Status IntrospectionService::DeletePolicy(grpc::ServerContext*,
                                          const kvmi::v1::DeletePolicyRequest* request,
                                          kvmi::v1::DeletePolicyResponse*) {
  if (request->name().empty()) return Invalid("name", "required");
  if (!daemon_->RemovePolicy(request->name())) {
    return Status(StatusCode::NOT_FOUND, "no policy '" + request->name() + "'");
  }
  spdlog::info("policy {} deleted through the API", request->name());
  return Status::OK;
}

// ---- ApiServer --------------------------------------------------------------------------------

ApiServer::ApiServer(Daemon* daemon) : service_(std::make_unique<IntrospectionService>(daemon)) {}

ApiServer::~ApiServer() { Shutdown(); }

std::string ApiServer::Start(const std::string& unix_socket, const std::string& tcp) {
  if (unix_socket.empty() && tcp.empty()) return "no API address (api_socket or api_tcp)";
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!unix_socket.empty()) {
    std::string dir = unix_socket.substr(0, unix_socket.rfind('/'));
    if (!dir.empty()) ::mkdir(dir.c_str(), 0750);  // /run/kvmid on a fresh host
    ::unlink(unix_socket.c_str());                 // a stale socket from a previous run
    builder.AddListeningPort("unix:" + unix_socket, grpc::InsecureServerCredentials());
  }
  if (!tcp.empty()) {
    builder.AddListeningPort(tcp, grpc::InsecureServerCredentials(), &tcp_port_);
  }
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (!server_) {
    return "cannot serve the API on " + (unix_socket.empty() ? "" : "unix:" + unix_socket + " ") +
           tcp;
  }
  if (!tcp.empty() && tcp_port_ == 0) return "cannot listen on " + tcp;
  unix_socket_ = unix_socket;
  spdlog::info("API (kvmi.v1.Introspection, reflection, health) on {}{}",
               unix_socket.empty() ? "" : "unix:" + unix_socket + " ", tcp);
  return "";
}

void ApiServer::Shutdown() {
  if (!server_) return;
  // Streams end within their 200 ms poll; give them a moment, then cut.
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server_.reset();
  if (!unix_socket_.empty()) ::unlink(unix_socket_.c_str());
}

}  // namespace kvmid
