#include "daemon/api/health_service.h"

#include <spdlog/spdlog.h>

#include <optional>

namespace kvmid::api {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch call: writes its name's status now and on every change.
class HealthService::Watcher final : public WriteReactor<HealthCheckResponse> {
 public:
  Watcher(HealthService* service, std::string name) : service_(service), name_(std::move(name)) {}

  const std::string& name() const { return name_; }

  // The name's status is `status` (called with the service's lock held; never blocks).
  void Send(ServingStatus status) {
    MutexLock lock(&mu_);
    if (ended_ || end_.has_value()) return;
    if (writing_) {
      pending_ = status;
      return;
    }
    WriteLocked(status);
  }

  // Finishes with `status` once what was sent is written (called with the service's lock held).
  void End(const grpc::Status& status) {
    MutexLock lock(&mu_);
    if (ended_ || end_.has_value()) return;
    end_ = status;
    if (!writing_) FinishLocked();
  }

  void OnWriteDone(bool ok) override {
    MutexLock lock(&mu_);
    writing_ = false;
    if (ended_) return;
    if (ok && pending_.has_value()) {
      const ServingStatus next = *pending_;
      pending_.reset();
      WriteLocked(next);
      return;
    }
    // Nothing more to write, or the write failed (the call broke: OnCancel finishes it unless it
    // was being ended anyway).
    if (end_.has_value()) FinishLocked();
  }

  void OnCancel() override {
    service_->Remove(this);
    MutexLock lock(&mu_);
    if (ended_) return;
    ended_ = true;
    Finish(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    service_->Remove(this);
    delete this;
  }

 private:
  void FinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ended_ = true;
    Finish(*end_);
  }
  void WriteLocked(ServingStatus status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    writing_ = true;
    message_.set_status(status);
    StartWrite(&message_);
  }

  HealthService* const service_;
  const std::string name_;
  Mutex mu_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<ServingStatus> pending_ ABSL_GUARDED_BY(mu_);
  std::optional<grpc::Status> end_ ABSL_GUARDED_BY(mu_);  // End() was called
  HealthCheckResponse message_ ABSL_GUARDED_BY(mu_);
};

HealthService::~HealthService() {
  MutexLock lock(&mu_);
  if (!watchers_.empty())
    spdlog::error("health: {} Watch calls outlive the service", watchers_.size());
}

void HealthService::ServeAsync(AsyncServer* async) {
  async->ServerStreaming<HealthCheckRequest, HealthCheckResponse>(
      [this](grpc::ServerContext* context, HealthCheckRequest* request,
             grpc::ServerAsyncWriter<HealthCheckResponse>* writer, grpc::ServerCompletionQueue* cq,
             void* tag) { RequestWatch(context, request, writer, cq, cq, tag); },
      [this](grpc::ServerContext*, const HealthCheckRequest* request) {
        auto* watcher = new Watcher(this, request->service());
        MutexLock lock(&mu_);
        watchers_.insert(watcher);
        watcher->Send(StatusOf(watcher->name()));
        if (end_watches_.has_value()) watcher->End(*end_watches_);
        return watcher;
      });
}

HealthService::ServingStatus HealthService::StatusOf(const std::string& service) const {
  auto it = serving_.find(service);
  if (it == serving_.end()) return HealthCheckResponse::SERVICE_UNKNOWN;
  return it->second && !shut_down_ ? HealthCheckResponse::SERVING
                                   : HealthCheckResponse::NOT_SERVING;
}

void HealthService::SetServing(const std::string& service, bool serving) {
  MutexLock lock(&mu_);
  serving_[service] = serving;
  const ServingStatus status = StatusOf(service);
  for (Watcher* watcher : watchers_) {
    if (watcher->name() == service) watcher->Send(status);
  }
}

void HealthService::Shutdown() {
  MutexLock lock(&mu_);
  shut_down_ = true;
  for (Watcher* watcher : watchers_) watcher->Send(StatusOf(watcher->name()));
}

void HealthService::EndWatches(const grpc::Status& status) {
  MutexLock lock(&mu_);
  end_watches_ = status;
  for (Watcher* watcher : watchers_) watcher->End(status);
}

void HealthService::Remove(Watcher* watcher) {
  MutexLock lock(&mu_);
  watchers_.erase(watcher);
}

grpc::Status HealthService::Check(grpc::ServerContext* /*context*/,
                                  const HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  MutexLock lock(&mu_);
  const ServingStatus status = StatusOf(request->service());
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        "service \"" + request->service() + "\" is not known to kvmid's health");
  }
  response->set_status(status);
  return grpc::Status::OK;
}

}  // namespace kvmid::api
