// One SetPageAccess call of one owner on one guest, as an object with three steps:
//
//   Plan      (guest lock held)  the owner's lease takes the new rights; the pages whose
//                                effective rights change are marked applied and listed to send;
//   Send      (loop thread)      the listed pages go to the host (SET_PAGE_ACCESS, split per
//                                message); the answer gives one error per page;
//   RollBack  (guest lock held)  after a failure, lease and applied rights go back: for every
//                                page (all_or_nothing) or for the failed pages only; the pages
//                                that did change on the host are listed to send back (SendUndo).
//
// The guest owns the locking and the order of the steps (Guest::SetPages); this object owns
// what each step computes, so each step can be tested on its own.
#ifndef KVMID_DAEMON_GUEST_PAGE_ACCESS_CHANGE_H_
#define KVMID_DAEMON_GUEST_PAGE_ACCESS_CHANGE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "daemon/registry/arming.h"
#include "daemon/session/guest_session.h"
#include "kernel/abi/messages.h"

namespace kvmid {

class PageAccessChange {
 public:
  // `pages`: gfn -> KVMI_PAGE_ACCESS_* bits the owner wants (rwx = no restriction); a gfn may
  // appear more than once (the last one wins, every one gets an error slot).
  PageAccessChange(OwnerId owner, std::vector<std::pair<uint64_t, uint8_t>> pages,
                   bool all_or_nothing);

  // Step 1, under the guest's lock: edits the owner's lease in `leases` and marks the resulting
  // effective rights as applied in `applied`. Call once.
  void Plan(Leases* leases, Arming* applied);
  // What Plan decided to send (gfn order); empty = nothing changes on the host.
  const std::vector<kvmi::PageAccess>& entries() const { return entries_; }

  // Step 2, loop thread: sends entries() (which must not be empty) and records the host's
  // answer; `answered` runs on the loop thread once every message is answered. This object
  // must live until then (Guest::SetPages keeps it in `answered`).
  void Send(const std::shared_ptr<GuestSession>& session, std::function<void()> answered);
  // Or, for tests and callers that sent themselves: the host's error per entry of entries().
  void RecordAnswer(const std::vector<int32_t>& per_entry);
  bool failed() const { return failed_; }
  // One error per requested page, in request order (0 for a page that needed no change).
  std::vector<int32_t> errors() const;

  // Step 3, under the guest's lock, after a failure: puts back the lease and applied rights of
  // every page (all_or_nothing) or of the failed ones, and returns what must be sent to take the
  // host back (pages that changed there; only all_or_nothing has any). Call once, after Send.
  std::vector<kvmi::PageAccess> RollBack(Leases* leases, Arming* applied);
  // Whether the caller's whole call was undone (all_or_nothing and a failure).
  bool rolled_back() const { return failed_ && all_or_nothing_; }

  // Sends what RollBack returned; `done` gets one text per failed message (loop thread).
  static void SendUndo(const std::shared_ptr<GuestSession>& session,
                       std::vector<kvmi::PageAccess> undo,
                       std::function<void(std::vector<std::string> failures)> done);

 private:
  struct Change {
    uint64_t gfn;
    uint8_t before;  // effective rights before the call
    uint8_t after;
  };
  bool PageFailed(uint64_t gfn) const;

  const OwnerId owner_;
  const std::vector<std::pair<uint64_t, uint8_t>> pages_;
  const bool all_or_nothing_;
  std::map<uint64_t, std::optional<uint8_t>> old_lease_;  // the owner's entries before (by gfn)
  std::vector<Change> changes_;                           // gfn order
  std::vector<kvmi::PageAccess> entries_;                 // one per change
  std::map<uint64_t, int32_t> error_of_;                  // gfn -> the host's error
  bool failed_ = false;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_GUEST_PAGE_ACCESS_CHANGE_H_
