/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The KVM introspection (KVMI) wire ABI as posted in "[RFC PATCH v6 00/92] VM introspection"
 * (include/uapi/linux/kvmi.h + arch/x86/include/uapi/asm/kvmi.h), plus the QEMU handshake
 * structures of the KVM-VMI/qemu kvmi-v6 branch.
 *
 * Every name is the one the kernel documentation (kvmi.rst) uses, so a reader of the docs
 * finds it here. Sizes and offsets are the x86-64 ones of ../shared/kvmi/KVMI-V6-ABI.md and are
 * checked at compile time in kvmi_layout_check.h (C and C++ alike).
 *
 * This header is C-compatible on purpose: it is the contract, shared by the codec, the
 * host-side model, the daemon and anything a user links against.
 */
#ifndef KVMID_KERNEL_UAPI_KVMI_H_
#define KVMID_KERNEL_UAPI_KVMI_H_

/* struct kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_msr_entry come from the kernel's own
 * UAPI (asm/kvm.h), as in the v6 series. kvm_msrs and kvm_xsave are NOT used inside KVMI
 * structures here: Linux >= 6.1 declares their flexible arrays with __DECLARE_FLEX_ARRAY, whose
 * empty struct is 1 byte in C++, so from C++ sizeof(struct kvm_msrs) is 16, not 8, and
 * sizeof(struct kvm_xsave) is 4100, not 4096. The wire layouts below spell those parts out. */
#include <linux/kvm.h>
#include <linux/types.h>

/* ---- §1 Protocol version and limits ------------------------------------------------------ */

enum { KVMI_VERSION = 0x00000001 };

/* Largest payload the v6 kernel accepts (hdr.size); it CLOSEs the session above this. */
#define KVMI_MSG_SIZE (4096 - 8)
/* Largest payload the kernel may send to the tool: GET_XSAVE / 4096-byte READ_PHYSICAL. */
#define KVMI_MAX_REPLY_PAYLOAD (8 + 4096)
#define KVMI_PAGE_SIZE 4096

/* ---- §2 Message ids ------------------------------------------------------------------------ */

enum {
  KVMI_EVENT_REPLY = 0,
  KVMI_EVENT = 1,

  KVMI_FIRST_COMMAND = 2,

  KVMI_GET_VERSION = 2,
  KVMI_CHECK_COMMAND = 3,
  KVMI_CHECK_EVENT = 4,
  KVMI_GET_GUEST_INFO = 5,
  KVMI_GET_VCPU_INFO = 6,
  KVMI_PAUSE_VCPU = 7,
  KVMI_CONTROL_VM_EVENTS = 8,
  KVMI_CONTROL_EVENTS = 9,
  KVMI_CONTROL_CR = 10,
  KVMI_CONTROL_MSR = 11,
  KVMI_CONTROL_VE = 12,
  KVMI_GET_REGISTERS = 13,
  KVMI_SET_REGISTERS = 14,
  KVMI_GET_CPUID = 15,
  KVMI_GET_XSAVE = 16,
  KVMI_READ_PHYSICAL = 17,
  KVMI_WRITE_PHYSICAL = 18,
  KVMI_INJECT_EXCEPTION = 19,
  KVMI_GET_PAGE_ACCESS = 20,
  KVMI_SET_PAGE_ACCESS = 21,
  KVMI_GET_MAP_TOKEN = 22,
  KVMI_GET_MTRR_TYPE = 23,
  KVMI_CONTROL_SPP = 24,
  KVMI_GET_PAGE_WRITE_BITMAP = 25,
  KVMI_SET_PAGE_WRITE_BITMAP = 26,
  KVMI_CONTROL_CMD_RESPONSE = 27,

  KVMI_NEXT_AVAILABLE_COMMAND = 28,
};

/* ---- §3.1 Events --------------------------------------------------------------------------- */

enum {
  KVMI_EVENT_UNHOOK = 0,
  KVMI_EVENT_CR = 1,
  KVMI_EVENT_MSR = 2,
  KVMI_EVENT_XSETBV = 3,
  KVMI_EVENT_BREAKPOINT = 4,
  KVMI_EVENT_HYPERCALL = 5,
  KVMI_EVENT_PF = 6,
  KVMI_EVENT_TRAP = 7,
  KVMI_EVENT_DESCRIPTOR = 8,
  KVMI_EVENT_CREATE_VCPU = 9,
  KVMI_EVENT_PAUSE_VCPU = 10,
  KVMI_EVENT_SINGLESTEP = 11,

  KVMI_NUM_EVENTS = 12,
};

/* ---- §3.2 Actions -------------------------------------------------------------------------- */

enum {
  KVMI_EVENT_ACTION_CONTINUE = 0,
  KVMI_EVENT_ACTION_RETRY = 1,
  KVMI_EVENT_ACTION_CRASH = 2,
};

/* ---- §3.3 Misc constants ------------------------------------------------------------------- */

#define KVMI_PAGE_ACCESS_R (1 << 0)
#define KVMI_PAGE_ACCESS_W (1 << 1)
#define KVMI_PAGE_ACCESS_X (1 << 2)
#define KVMI_PAGE_ACCESS_RWX (KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_W | KVMI_PAGE_ACCESS_X)

#define KVMI_DESC_IDTR 1
#define KVMI_DESC_GDTR 2
#define KVMI_DESC_LDTR 3
#define KVMI_DESC_TR 4

#define KVM_CAP_INTROSPECTION 999

#define KVM_HC_MEM_MAP 32
#define KVM_HC_MEM_UNMAP 33
#define KVM_HC_XEN_HVM_OP 34
#define KVM_HC_XEN_HVM_OP_GUEST_REQUEST_VM_EVENT 24

/* kvmi_event_trap.type (VMX interruption-type encoding). */
#define KVMI_TRAP_TYPE_EXT_INTR 0x000
#define KVMI_TRAP_TYPE_NMI 0x200
#define KVMI_TRAP_TYPE_HARD_EXCEPTION 0x300
#define KVMI_TRAP_TYPE_SOFT_INTR 0x400
#define KVMI_TRAP_TYPE_SOFT_EXCEPTION 0x600

/* Kernel-internal limits the tool can observe. */
#define KVMI_MAX_PAUSE_REQUESTS 1001 /* PAUSE_VCPU -> -KVM_EBUSY above this many pending */
#define KVMI_MEM_MAX_TOKENS 8        /* GET_MAP_TOKEN -> -KVM_EAGAIN above this many */
#define KVMI_CTX_DATA_SIZE 256       /* kvmi_event_pf_reply.ctx_data */
#define KVMI_SPP_SUBPAGES 32         /* 128-byte sub-pages per 4 KiB page */

/* MSR ranges CONTROL_MSR accepts (§5.10). */
#define KVMI_MSR_LOW_FIRST 0x00000000u
#define KVMI_MSR_LOW_LAST 0x00001fffu
#define KVMI_MSR_HIGH_FIRST 0xc0000000u
#define KVMI_MSR_HIGH_LAST 0xc0001fffu

/* ---- §3.4 Error codes (include/uapi/linux/kvm_para.h after v6) -------------------------------
 * Sent negated in kvmi_error_code.err. linux/kvm_para.h of a stock kernel has only some. */
#ifndef KVM_ENOSYS
#define KVM_ENOSYS 1000
#endif
#ifndef KVM_EFAULT
#define KVM_EFAULT 14
#endif
#ifndef KVM_EINVAL
#define KVM_EINVAL 22
#endif
#ifndef KVM_E2BIG
#define KVM_E2BIG 7
#endif
#ifndef KVM_EPERM
#define KVM_EPERM 1
#endif
#ifndef KVM_EOPNOTSUPP
#define KVM_EOPNOTSUPP 95
#endif
#ifndef KVM_EAGAIN
#define KVM_EAGAIN 11
#endif
#ifndef KVM_EBUSY
#define KVM_EBUSY 16
#endif
#ifndef KVM_ENOMEM
#define KVM_ENOMEM 12
#endif
#ifndef KVM_ENOENT
#define KVM_ENOENT 2
#endif

/* ---- §4.1 Generic structures ---------------------------------------------------------------- */

struct kvmi_msg_hdr {
  __u16 id;
  __u16 size; /* payload bytes, after this header */
  __u32 seq;
};

struct kvmi_error_code {
  __s32 err;
  __u32 padding;
};

struct kvmi_vcpu_hdr {
  __u16 vcpu;
  __u16 padding1;
  __u32 padding2;
};

/* ---- §5 Command payloads --------------------------------------------------------------------- */

struct kvmi_get_version_reply {
  __u32 version;
  __u32 padding;
};

struct kvmi_control_cmd_response {
  __u8 enable;
  __u8 now;
  __u16 padding1;
  __u32 padding2;
};

struct kvmi_check_command {
  __u16 id;
  __u16 padding1;
  __u32 padding2;
};

struct kvmi_check_event {
  __u16 id;
  __u16 padding1;
  __u32 padding2;
};

struct kvmi_get_guest_info_reply {
  __u32 vcpu_count;
  __u32 padding[3];
};

struct kvmi_get_vcpu_info_reply {
  __u64 tsc_speed;
};

struct kvmi_pause_vcpu {
  __u8 wait;
  __u8 padding1;
  __u16 padding2;
  __u32 padding3;
};

struct kvmi_control_vm_events {
  __u16 event_id;
  __u8 enable;
  __u8 padding1;
  __u32 padding2;
};

struct kvmi_control_events {
  __u16 event_id;
  __u8 enable;
  __u8 padding1;
  __u32 padding2;
};

struct kvmi_control_cr {
  __u8 enable;
  __u8 padding1;
  __u16 padding2;
  __u32 cr;
};

struct kvmi_control_msr {
  __u8 enable;
  __u8 padding1;
  __u16 padding2;
  __u32 msr;
};

struct kvmi_get_registers {
  __u16 nmsrs;
  __u16 padding1;
  __u32 padding2;
  __u32 msrs_idx[0];
};

struct kvmi_get_registers_reply {
  __u32 mode;
  __u32 padding;
  struct kvm_regs regs;
  struct kvm_sregs sregs;
  struct {
    __u32 nmsrs; /* = request nmsrs */
    __u32 pad;
    struct kvm_msr_entry entries[0];
  } msrs; /* wire layout of struct kvm_msrs */
};

struct kvmi_get_cpuid {
  __u32 function;
  __u32 index;
};

struct kvmi_get_cpuid_reply {
  __u32 eax;
  __u32 ebx;
  __u32 ecx;
  __u32 edx;
};

/* The XSAVE image the v6 kernel sends: exactly a struct kvm_xsave (4096 bytes); a tool should
 * still derive the length from hdr.size - 8. */
#define KVMI_XSAVE_SIZE 4096

struct kvmi_get_xsave_reply {
  __u32 region[0];
};

struct kvmi_read_physical {
  __u64 gpa;
  __u64 size;
};

struct kvmi_write_physical {
  __u64 gpa;
  __u64 size;
  __u8 data[0];
};

struct kvmi_inject_exception {
  __u8 nr;
  __u8 has_error;
  __u16 padding;
  __u32 error_code;
  __u64 address;
};

struct kvmi_get_page_access {
  __u16 view;
  __u16 count;
  __u32 padding;
  __u64 gpa[0];
};

struct kvmi_get_page_access_reply {
  __u8 access[0];
};

struct kvmi_page_access_entry {
  __u64 gpa;
  __u8 access;
  __u8 padding1;
  __u16 padding2;
  __u32 padding3;
};

struct kvmi_set_page_access {
  __u16 view;
  __u16 count;
  __u32 padding;
  struct kvmi_page_access_entry entries[0];
};

struct kvmi_map_mem_token {
  __u64 token[4];
};

struct kvmi_get_map_token_reply {
  struct kvmi_map_mem_token token;
};

struct kvmi_get_mtrr_type {
  __u64 gpa;
};

struct kvmi_get_mtrr_type_reply {
  __u8 type;
  __u8 padding[7];
};

struct kvmi_control_spp {
  __u8 enable;
  __u8 padding1;
  __u16 padding2;
  __u32 padding3;
};

struct kvmi_get_page_write_bitmap {
  __u16 view;
  __u16 count;
  __u32 padding;
  __u64 gpa[0];
};

struct kvmi_get_page_write_bitmap_reply {
  __u32 bitmap[0];
};

struct kvmi_page_write_bitmap_entry {
  __u64 gpa;
  __u32 bitmap;
  __u32 padding;
};

struct kvmi_set_page_write_bitmap {
  __u16 view;
  __u16 count;
  __u32 padding;
  struct kvmi_page_write_bitmap_entry entries[0];
};

/* ---- §4.2 / §6 Events ------------------------------------------------------------------------ */

struct kvmi_event_arch {
  __u8 mode; /* 2, 4 or 8 */
  __u8 padding[7];
  struct kvm_regs regs;
  struct kvm_sregs sregs;
  struct {
    __u64 sysenter_cs;
    __u64 sysenter_esp;
    __u64 sysenter_eip;
    __u64 efer;
    __u64 star;
    __u64 lstar;
    __u64 cstar;
    __u64 pat;
    __u64 shadow_gs;
  } msrs;
};

struct kvmi_event {
  __u16 size; /* sizeof(struct kvmi_event); specific data starts at this payload offset */
  __u16 vcpu;
  __u8 event;
  __u8 padding[3];
  struct kvmi_event_arch arch;
};

struct kvmi_event_reply {
  __u8 action;
  __u8 event;
  __u16 padding1;
  __u32 padding2;
};

struct kvmi_event_cr {
  __u16 cr;
  __u16 padding[3];
  __u64 old_value;
  __u64 new_value;
};

struct kvmi_event_cr_reply {
  __u64 new_val;
};

struct kvmi_event_msr {
  __u32 msr;
  __u32 padding;
  __u64 old_value;
  __u64 new_value;
};

struct kvmi_event_msr_reply {
  __u64 new_val;
};

struct kvmi_event_breakpoint {
  __u64 gpa;
  __u8 insn_len;
  __u8 padding[7];
};

struct kvmi_event_pf {
  __u64 gva;
  __u64 gpa;
  __u8 access;
  __u8 padding1;
  __u16 view;
  __u32 padding2;
};

struct kvmi_event_pf_reply {
  __u64 ctx_addr;
  __u32 ctx_size;
  __u8 singlestep;
  __u8 rep_complete;
  __u16 padding;
  __u8 ctx_data[KVMI_CTX_DATA_SIZE];
};

struct kvmi_event_trap {
  __u32 vector;
  __u32 type;
  __u32 error_code;
  __u32 padding;
  __u64 cr2;
};

struct kvmi_event_descriptor {
  __u8 descriptor;
  __u8 write;
  __u8 padding[6];
};

/* ---- §8 Host-side interfaces ----------------------------------------------------------------- */

struct kvm_introspection {
  __s32 fd;
  __u32 padding;
  __u8 uuid[16];
};

struct kvm_introspection_feature {
  __u32 allow;
  __s32 id;
};

#define KVM_INTROSPECTION_HOOK _IOW(KVMIO, 0xff, struct kvm_introspection)
#define KVM_INTROSPECTION_UNHOOK _IO(KVMIO, 0xfe)
#define KVM_INTROSPECTION_COMMAND _IOW(KVMIO, 0xfd, struct kvm_introspection_feature)
#define KVM_INTROSPECTION_EVENT _IOW(KVMIO, 0xfc, struct kvm_introspection_feature)

struct kvmi_mem_map {
  struct kvmi_map_mem_token token;
  __u64 gpa;
  __u64 gva;
};

/* ---- §9 QEMU <-> tool handshake (KVM-VMI/qemu kvmi-v6) -------------------------------------- */

struct kvmi_qemu2introspector {
  __u32 struct_size; /* 96 */
  __u8 uuid[16];
  __u32 padding;
  __s64 start_time; /* QEMU kvmi-v6: "padding2", left 0; kvmi-v7 fills it */
  char name[64];    /* QEMU kvmi-v6: zeros; kvmi-v7 fills it */
};

struct kvmi_introspector2qemu {
  __u32 struct_size;    /* 24 */
  __u8 cookie_hash[20]; /* SHA-1 of the shared secret (checked by kvmi-v7 QEMU) */
};

#endif /* KVMID_KERNEL_UAPI_KVMI_H_ */
