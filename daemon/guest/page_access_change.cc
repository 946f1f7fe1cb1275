#include "daemon/guest/page_access_change.h"

#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

constexpr uint8_t kAll = KVMI_PAGE_ACCESS_RWX;  // no restriction: the kernel forgets the page

uint8_t RightsOf(const Arming& arming, uint64_t gfn) {
  auto it = arming.page_access.find(gfn);
  return it == arming.page_access.end() ? kAll : it->second;
}

void SetRights(Arming* arming, uint64_t gfn, uint8_t access) {
  if (access == kAll) {
    arming->page_access.erase(gfn);
  } else {
    arming->page_access[gfn] = access;
  }
}

Arming LeaseOf(const Leases& leases, const OwnerId& owner) {
  auto it = leases.by_owner().find(owner);
  return it == leases.by_owner().end() ? Arming() : it->second;
}

kvmi::PageAccess Entry(uint64_t gfn, uint8_t access) {
  kvmi::PageAccess entry;
  entry.gpa = gfn * KVMI_PAGE_SIZE;
  entry.access = access;
  return entry;
}

}  // namespace

PageAccessChange::PageAccessChange(OwnerId owner, std::vector<std::pair<uint64_t, uint8_t>> pages,
                                   bool all_or_nothing)
    : owner_(std::move(owner)), pages_(std::move(pages)), all_or_nothing_(all_or_nothing) {}

void PageAccessChange::Plan(Leases* leases, Arming* applied) {
  Arming lease = LeaseOf(*leases, owner_);
  for (const auto& [gfn, access] : pages_) {
    if (old_lease_.count(gfn) == 0) {
      auto entry = lease.page_access.find(gfn);
      old_lease_[gfn] =
          entry == lease.page_access.end() ? std::nullopt : std::optional<uint8_t>(entry->second);
    }
    SetRights(&lease, gfn, access);
  }
  leases->Set(owner_, std::move(lease));
  const Arming wanted = leases->Effective();
  for (const auto& [gfn, previous] : old_lease_) {
    const uint8_t before = RightsOf(*applied, gfn);
    const uint8_t after = RightsOf(wanted, gfn);
    if (before == after) continue;
    changes_.push_back(Change{gfn, before, after});
    entries_.push_back(Entry(gfn, after));
    SetRights(applied, gfn, after);
  }
}

void PageAccessChange::Send(const std::shared_ptr<GuestSession>& session,
                            std::function<void()> answered) {
  // The session keeps the callback (and so this object's owner's references) until it answers.
  session->SetPageAccess(
      entries_, [this, answered = std::move(answered)](const std::vector<CommandResult>&,
                                                       const std::vector<int32_t>& per_entry) {
        RecordAnswer(per_entry);
        answered();
      });
}

void PageAccessChange::RecordAnswer(const std::vector<int32_t>& per_entry) {
  for (size_t i = 0; i < changes_.size(); ++i) {
    const int32_t err = i < per_entry.size() ? per_entry[i] : -KVM_EINVAL;
    error_of_[changes_[i].gfn] = err;
    failed_ = failed_ || err != 0;
  }
}

bool PageAccessChange::PageFailed(uint64_t gfn) const {
  auto it = error_of_.find(gfn);
  return it != error_of_.end() && it->second != 0;
}

std::vector<int32_t> PageAccessChange::errors() const {
  std::vector<int32_t> errors;
  errors.reserve(pages_.size());
  for (const auto& [gfn, access] : pages_) {
    auto it = error_of_.find(gfn);
    errors.push_back(it == error_of_.end() ? 0 : it->second);
  }
  return errors;
}

std::vector<kvmi::PageAccess> PageAccessChange::RollBack(Leases* leases, Arming* applied) {
  std::vector<kvmi::PageAccess> undo;
  if (!failed_) return undo;
  Arming lease = LeaseOf(*leases, owner_);
  for (const auto& [gfn, previous] : old_lease_) {
    if (!all_or_nothing_ && !PageFailed(gfn)) continue;
    if (previous) {
      lease.page_access[gfn] = *previous;
    } else {
      lease.page_access.erase(gfn);
    }
  }
  leases->Set(owner_, std::move(lease));
  for (const Change& c : changes_) {
    const bool page_failed = PageFailed(c.gfn);
    if (!all_or_nothing_ && !page_failed) continue;
    SetRights(applied, c.gfn, c.before);
    // A failed page never changed on the host; a page that did change goes back.
    if (!page_failed) undo.push_back(Entry(c.gfn, c.before));
  }
  return undo;
}

void PageAccessChange::SendUndo(const std::shared_ptr<GuestSession>& session,
                                std::vector<kvmi::PageAccess> undo,
                                std::function<void(std::vector<std::string>)> done) {
  session->SetPageAccess(std::move(undo),
                         [done = std::move(done)](const std::vector<CommandResult>& per_message,
                                                  const std::vector<int32_t>&) {
                           std::vector<std::string> failures;
                           for (const CommandResult& result : per_message) {
                             if (!result.ok()) failures.push_back(result.ToString());
                           }
                           done(std::move(failures));
                         });
}

}  // namespace kvmid
