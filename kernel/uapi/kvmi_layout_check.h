/* Compile-time proof that kvmi.h matches the x86-64 layouts of ../shared/kvmi/KVMI-V6-ABI.md
 * (sizes_x86_64.txt). Included by kvmi_layout_check.c (C) and the codec (C++). */
#ifndef KVMID_KERNEL_UAPI_KVMI_LAYOUT_CHECK_H_
#define KVMID_KERNEL_UAPI_KVMI_LAYOUT_CHECK_H_

#include <stddef.h>

#include "kernel/uapi/kvmi.h"

#ifdef __cplusplus
#define KVMI_ASSERT(cond, what) static_assert(cond, what)
#else
#define KVMI_ASSERT(cond, what) _Static_assert(cond, what)
#endif

/* KVMI_GET_MAX_GFN (libkvmi id 29) is not part of the v6 posting and has no struct here. */
#define KVMI_ASSERT_SIZE(type, n) KVMI_ASSERT(sizeof(struct type) == (n), "sizeof " #type)
#define KVMI_ASSERT_FIELD(type, field, off, n)                                      \
  KVMI_ASSERT(offsetof(struct type, field) == (off), "offsetof " #type "." #field); \
  KVMI_ASSERT(sizeof(((struct type*)0)->field) == (n), "sizeof " #type "." #field)

KVMI_ASSERT_SIZE(kvm_regs, 144);
KVMI_ASSERT_FIELD(kvm_regs, rax, 0, 8);
KVMI_ASSERT_FIELD(kvm_regs, rbx, 8, 8);
KVMI_ASSERT_FIELD(kvm_regs, rcx, 16, 8);
KVMI_ASSERT_FIELD(kvm_regs, rdx, 24, 8);
KVMI_ASSERT_FIELD(kvm_regs, rsi, 32, 8);
KVMI_ASSERT_FIELD(kvm_regs, rdi, 40, 8);
KVMI_ASSERT_FIELD(kvm_regs, rsp, 48, 8);
KVMI_ASSERT_FIELD(kvm_regs, rbp, 56, 8);
KVMI_ASSERT_FIELD(kvm_regs, r8, 64, 8);
KVMI_ASSERT_FIELD(kvm_regs, r9, 72, 8);
KVMI_ASSERT_FIELD(kvm_regs, r10, 80, 8);
KVMI_ASSERT_FIELD(kvm_regs, r11, 88, 8);
KVMI_ASSERT_FIELD(kvm_regs, r12, 96, 8);
KVMI_ASSERT_FIELD(kvm_regs, r13, 104, 8);
KVMI_ASSERT_FIELD(kvm_regs, r14, 112, 8);
KVMI_ASSERT_FIELD(kvm_regs, r15, 120, 8);
KVMI_ASSERT_FIELD(kvm_regs, rip, 128, 8);
KVMI_ASSERT_FIELD(kvm_regs, rflags, 136, 8);

KVMI_ASSERT_SIZE(kvm_segment, 24);
KVMI_ASSERT_FIELD(kvm_segment, base, 0, 8);
KVMI_ASSERT_FIELD(kvm_segment, limit, 8, 4);
KVMI_ASSERT_FIELD(kvm_segment, selector, 12, 2);
KVMI_ASSERT_FIELD(kvm_segment, type, 14, 1);
KVMI_ASSERT_FIELD(kvm_segment, present, 15, 1);
KVMI_ASSERT_FIELD(kvm_segment, dpl, 16, 1);
KVMI_ASSERT_FIELD(kvm_segment, db, 17, 1);
KVMI_ASSERT_FIELD(kvm_segment, s, 18, 1);
KVMI_ASSERT_FIELD(kvm_segment, l, 19, 1);
KVMI_ASSERT_FIELD(kvm_segment, g, 20, 1);
KVMI_ASSERT_FIELD(kvm_segment, avl, 21, 1);
KVMI_ASSERT_FIELD(kvm_segment, unusable, 22, 1);
KVMI_ASSERT_FIELD(kvm_segment, padding, 23, 1);

KVMI_ASSERT_SIZE(kvm_dtable, 16);
KVMI_ASSERT_FIELD(kvm_dtable, base, 0, 8);
KVMI_ASSERT_FIELD(kvm_dtable, limit, 8, 2);
KVMI_ASSERT_FIELD(kvm_dtable, padding, 10, 6);

KVMI_ASSERT_SIZE(kvm_sregs, 312);
KVMI_ASSERT_FIELD(kvm_sregs, cs, 0, 24);
KVMI_ASSERT_FIELD(kvm_sregs, ds, 24, 24);
KVMI_ASSERT_FIELD(kvm_sregs, es, 48, 24);
KVMI_ASSERT_FIELD(kvm_sregs, fs, 72, 24);
KVMI_ASSERT_FIELD(kvm_sregs, gs, 96, 24);
KVMI_ASSERT_FIELD(kvm_sregs, ss, 120, 24);
KVMI_ASSERT_FIELD(kvm_sregs, tr, 144, 24);
KVMI_ASSERT_FIELD(kvm_sregs, ldt, 168, 24);
KVMI_ASSERT_FIELD(kvm_sregs, gdt, 192, 16);
KVMI_ASSERT_FIELD(kvm_sregs, idt, 208, 16);
KVMI_ASSERT_FIELD(kvm_sregs, cr0, 224, 8);
KVMI_ASSERT_FIELD(kvm_sregs, cr2, 232, 8);
KVMI_ASSERT_FIELD(kvm_sregs, cr3, 240, 8);
KVMI_ASSERT_FIELD(kvm_sregs, cr4, 248, 8);
KVMI_ASSERT_FIELD(kvm_sregs, cr8, 256, 8);
KVMI_ASSERT_FIELD(kvm_sregs, efer, 264, 8);
KVMI_ASSERT_FIELD(kvm_sregs, apic_base, 272, 8);
KVMI_ASSERT_FIELD(kvm_sregs, interrupt_bitmap, 280, 32);

KVMI_ASSERT_SIZE(kvm_msr_entry, 16);
KVMI_ASSERT_FIELD(kvm_msr_entry, index, 0, 4);
KVMI_ASSERT_FIELD(kvm_msr_entry, reserved, 4, 4);
KVMI_ASSERT_FIELD(kvm_msr_entry, data, 8, 8);

/* kvm_msrs / kvm_xsave are checked from C only: see the note at the top of kvmi.h. */
#ifndef __cplusplus
KVMI_ASSERT_SIZE(kvm_msrs, 8);
KVMI_ASSERT_FIELD(kvm_msrs, nmsrs, 0, 4);
KVMI_ASSERT_FIELD(kvm_msrs, pad, 4, 4);
KVMI_ASSERT(offsetof(struct kvm_msrs, entries) == 8, "offsetof kvm_msrs.entries");

KVMI_ASSERT_SIZE(kvm_xsave, 4096);
#endif

KVMI_ASSERT_SIZE(kvmi_msg_hdr, 8);
KVMI_ASSERT_FIELD(kvmi_msg_hdr, id, 0, 2);
KVMI_ASSERT_FIELD(kvmi_msg_hdr, size, 2, 2);
KVMI_ASSERT_FIELD(kvmi_msg_hdr, seq, 4, 4);

KVMI_ASSERT_SIZE(kvmi_error_code, 8);
KVMI_ASSERT_FIELD(kvmi_error_code, err, 0, 4);
KVMI_ASSERT_FIELD(kvmi_error_code, padding, 4, 4);

KVMI_ASSERT_SIZE(kvmi_get_version_reply, 8);
KVMI_ASSERT_FIELD(kvmi_get_version_reply, version, 0, 4);
KVMI_ASSERT_FIELD(kvmi_get_version_reply, padding, 4, 4);

KVMI_ASSERT_SIZE(kvmi_control_cmd_response, 8);
KVMI_ASSERT_FIELD(kvmi_control_cmd_response, enable, 0, 1);
KVMI_ASSERT_FIELD(kvmi_control_cmd_response, now, 1, 1);
KVMI_ASSERT_FIELD(kvmi_control_cmd_response, padding1, 2, 2);
KVMI_ASSERT_FIELD(kvmi_control_cmd_response, padding2, 4, 4);

KVMI_ASSERT_SIZE(kvmi_check_command, 8);
KVMI_ASSERT_FIELD(kvmi_check_command, id, 0, 2);
KVMI_ASSERT_FIELD(kvmi_check_command, padding1, 2, 2);
KVMI_ASSERT_FIELD(kvmi_check_command, padding2, 4, 4);

KVMI_ASSERT_SIZE(kvmi_check_event, 8);

KVMI_ASSERT_SIZE(kvmi_get_guest_info_reply, 16);
KVMI_ASSERT_FIELD(kvmi_get_guest_info_reply, vcpu_count, 0, 4);
KVMI_ASSERT_FIELD(kvmi_get_guest_info_reply, padding, 4, 12);

KVMI_ASSERT_SIZE(kvmi_get_page_access, 8);
KVMI_ASSERT_FIELD(kvmi_get_page_access, view, 0, 2);
KVMI_ASSERT_FIELD(kvmi_get_page_access, count, 2, 2);
KVMI_ASSERT_FIELD(kvmi_get_page_access, padding, 4, 4);
KVMI_ASSERT(offsetof(struct kvmi_get_page_access, gpa) == 8, "offsetof kvmi_get_page_access.gpa");

KVMI_ASSERT_SIZE(kvmi_get_page_access_reply, 0);

KVMI_ASSERT_SIZE(kvmi_page_access_entry, 16);
KVMI_ASSERT_FIELD(kvmi_page_access_entry, gpa, 0, 8);
KVMI_ASSERT_FIELD(kvmi_page_access_entry, access, 8, 1);
KVMI_ASSERT_FIELD(kvmi_page_access_entry, padding1, 9, 1);
KVMI_ASSERT_FIELD(kvmi_page_access_entry, padding2, 10, 2);
KVMI_ASSERT_FIELD(kvmi_page_access_entry, padding3, 12, 4);

KVMI_ASSERT_SIZE(kvmi_set_page_access, 8);
KVMI_ASSERT_FIELD(kvmi_set_page_access, view, 0, 2);
KVMI_ASSERT_FIELD(kvmi_set_page_access, count, 2, 2);
KVMI_ASSERT_FIELD(kvmi_set_page_access, padding, 4, 4);
KVMI_ASSERT(offsetof(struct kvmi_set_page_access, entries) == 8,
            "offsetof kvmi_set_page_access.entries");

KVMI_ASSERT_SIZE(kvmi_control_spp, 8);
KVMI_ASSERT_FIELD(kvmi_control_spp, enable, 0, 1);
KVMI_ASSERT_FIELD(kvmi_control_spp, padding1, 1, 1);
KVMI_ASSERT_FIELD(kvmi_control_spp, padding2, 2, 2);
KVMI_ASSERT_FIELD(kvmi_control_spp, padding3, 4, 4);

KVMI_ASSERT_SIZE(kvmi_get_page_write_bitmap, 8);
KVMI_ASSERT(offsetof(struct kvmi_get_page_write_bitmap, gpa) == 8,
            "offsetof kvmi_get_page_write_bitmap.gpa");

KVMI_ASSERT_SIZE(kvmi_get_page_write_bitmap_reply, 0);

KVMI_ASSERT_SIZE(kvmi_page_write_bitmap_entry, 16);
KVMI_ASSERT_FIELD(kvmi_page_write_bitmap_entry, gpa, 0, 8);
KVMI_ASSERT_FIELD(kvmi_page_write_bitmap_entry, bitmap, 8, 4);
KVMI_ASSERT_FIELD(kvmi_page_write_bitmap_entry, padding, 12, 4);

KVMI_ASSERT_SIZE(kvmi_set_page_write_bitmap, 8);
KVMI_ASSERT(offsetof(struct kvmi_set_page_write_bitmap, entries) == 8,
            "offsetof kvmi_set_page_write_bitmap.entries");

KVMI_ASSERT_SIZE(kvmi_get_vcpu_info_reply, 8);

KVMI_ASSERT_SIZE(kvmi_pause_vcpu, 8);
KVMI_ASSERT_FIELD(kvmi_pause_vcpu, wait, 0, 1);
KVMI_ASSERT_FIELD(kvmi_pause_vcpu, padding1, 1, 1);
KVMI_ASSERT_FIELD(kvmi_pause_vcpu, padding2, 2, 2);
KVMI_ASSERT_FIELD(kvmi_pause_vcpu, padding3, 4, 4);

KVMI_ASSERT_SIZE(kvmi_control_events, 8);
KVMI_ASSERT_FIELD(kvmi_control_events, event_id, 0, 2);
KVMI_ASSERT_FIELD(kvmi_control_events, enable, 2, 1);
KVMI_ASSERT_FIELD(kvmi_control_events, padding1, 3, 1);
KVMI_ASSERT_FIELD(kvmi_control_events, padding2, 4, 4);

KVMI_ASSERT_SIZE(kvmi_control_vm_events, 8);

KVMI_ASSERT_SIZE(kvmi_read_physical, 16);
KVMI_ASSERT_FIELD(kvmi_read_physical, gpa, 0, 8);
KVMI_ASSERT_FIELD(kvmi_read_physical, size, 8, 8);

KVMI_ASSERT_SIZE(kvmi_write_physical, 16);
KVMI_ASSERT_FIELD(kvmi_write_physical, gpa, 0, 8);
KVMI_ASSERT_FIELD(kvmi_write_physical, size, 8, 8);
KVMI_ASSERT(offsetof(struct kvmi_write_physical, data) == 16, "offsetof kvmi_write_physical.data");

KVMI_ASSERT_SIZE(kvmi_vcpu_hdr, 8);
KVMI_ASSERT_FIELD(kvmi_vcpu_hdr, vcpu, 0, 2);
KVMI_ASSERT_FIELD(kvmi_vcpu_hdr, padding1, 2, 2);
KVMI_ASSERT_FIELD(kvmi_vcpu_hdr, padding2, 4, 4);

KVMI_ASSERT_SIZE(kvmi_inject_exception, 16);
KVMI_ASSERT_FIELD(kvmi_inject_exception, nr, 0, 1);
KVMI_ASSERT_FIELD(kvmi_inject_exception, has_error, 1, 1);
KVMI_ASSERT_FIELD(kvmi_inject_exception, padding, 2, 2);
KVMI_ASSERT_FIELD(kvmi_inject_exception, error_code, 4, 4);
KVMI_ASSERT_FIELD(kvmi_inject_exception, address, 8, 8);

KVMI_ASSERT_SIZE(kvmi_event_arch, 536);
KVMI_ASSERT_FIELD(kvmi_event_arch, mode, 0, 1);
KVMI_ASSERT_FIELD(kvmi_event_arch, padding, 1, 7);
KVMI_ASSERT_FIELD(kvmi_event_arch, regs, 8, 144);
KVMI_ASSERT_FIELD(kvmi_event_arch, sregs, 152, 312);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs, 464, 72);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.sysenter_cs, 464, 8);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.sysenter_esp, 472, 8);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.sysenter_eip, 480, 8);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.efer, 488, 8);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.star, 496, 8);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.lstar, 504, 8);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.cstar, 512, 8);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.pat, 520, 8);
KVMI_ASSERT_FIELD(kvmi_event_arch, msrs.shadow_gs, 528, 8);

KVMI_ASSERT_SIZE(kvmi_event, 544);
KVMI_ASSERT_FIELD(kvmi_event, size, 0, 2);
KVMI_ASSERT_FIELD(kvmi_event, vcpu, 2, 2);
KVMI_ASSERT_FIELD(kvmi_event, event, 4, 1);
KVMI_ASSERT_FIELD(kvmi_event, padding, 5, 3);
KVMI_ASSERT_FIELD(kvmi_event, arch, 8, 536);
KVMI_ASSERT_FIELD(kvmi_event, arch.regs, 16, 144);
KVMI_ASSERT_FIELD(kvmi_event, arch.sregs, 160, 312);
KVMI_ASSERT_FIELD(kvmi_event, arch.msrs, 472, 72);

KVMI_ASSERT_SIZE(kvmi_event_reply, 8);
KVMI_ASSERT_FIELD(kvmi_event_reply, action, 0, 1);
KVMI_ASSERT_FIELD(kvmi_event_reply, event, 1, 1);
KVMI_ASSERT_FIELD(kvmi_event_reply, padding1, 2, 2);
KVMI_ASSERT_FIELD(kvmi_event_reply, padding2, 4, 4);

KVMI_ASSERT_SIZE(kvmi_event_pf, 24);
KVMI_ASSERT_FIELD(kvmi_event_pf, gva, 0, 8);
KVMI_ASSERT_FIELD(kvmi_event_pf, gpa, 8, 8);
KVMI_ASSERT_FIELD(kvmi_event_pf, access, 16, 1);
KVMI_ASSERT_FIELD(kvmi_event_pf, padding1, 17, 1);
KVMI_ASSERT_FIELD(kvmi_event_pf, view, 18, 2);
KVMI_ASSERT_FIELD(kvmi_event_pf, padding2, 20, 4);

KVMI_ASSERT_SIZE(kvmi_event_pf_reply, 272);
KVMI_ASSERT_FIELD(kvmi_event_pf_reply, ctx_addr, 0, 8);
KVMI_ASSERT_FIELD(kvmi_event_pf_reply, ctx_size, 8, 4);
KVMI_ASSERT_FIELD(kvmi_event_pf_reply, singlestep, 12, 1);
KVMI_ASSERT_FIELD(kvmi_event_pf_reply, rep_complete, 13, 1);
KVMI_ASSERT_FIELD(kvmi_event_pf_reply, padding, 14, 2);
KVMI_ASSERT_FIELD(kvmi_event_pf_reply, ctx_data, 16, 256);

KVMI_ASSERT_SIZE(kvmi_event_breakpoint, 16);
KVMI_ASSERT_FIELD(kvmi_event_breakpoint, gpa, 0, 8);
KVMI_ASSERT_FIELD(kvmi_event_breakpoint, insn_len, 8, 1);
KVMI_ASSERT_FIELD(kvmi_event_breakpoint, padding, 9, 7);

KVMI_ASSERT_SIZE(kvmi_map_mem_token, 32);

KVMI_ASSERT_SIZE(kvmi_get_map_token_reply, 32);

KVMI_ASSERT_SIZE(kvmi_mem_map, 48);
KVMI_ASSERT_FIELD(kvmi_mem_map, token, 0, 32);
KVMI_ASSERT_FIELD(kvmi_mem_map, gpa, 32, 8);
KVMI_ASSERT_FIELD(kvmi_mem_map, gva, 40, 8);

KVMI_ASSERT_SIZE(kvmi_event_trap, 24);
KVMI_ASSERT_FIELD(kvmi_event_trap, vector, 0, 4);
KVMI_ASSERT_FIELD(kvmi_event_trap, type, 4, 4);
KVMI_ASSERT_FIELD(kvmi_event_trap, error_code, 8, 4);
KVMI_ASSERT_FIELD(kvmi_event_trap, padding, 12, 4);
KVMI_ASSERT_FIELD(kvmi_event_trap, cr2, 16, 8);

KVMI_ASSERT_SIZE(kvmi_get_registers, 8);
KVMI_ASSERT_FIELD(kvmi_get_registers, nmsrs, 0, 2);
KVMI_ASSERT_FIELD(kvmi_get_registers, padding1, 2, 2);
KVMI_ASSERT_FIELD(kvmi_get_registers, padding2, 4, 4);
KVMI_ASSERT(offsetof(struct kvmi_get_registers, msrs_idx) == 8,
            "offsetof kvmi_get_registers.msrs_idx");

KVMI_ASSERT_SIZE(kvmi_get_registers_reply, 472);
KVMI_ASSERT_FIELD(kvmi_get_registers_reply, mode, 0, 4);
KVMI_ASSERT_FIELD(kvmi_get_registers_reply, padding, 4, 4);
KVMI_ASSERT_FIELD(kvmi_get_registers_reply, regs, 8, 144);
KVMI_ASSERT_FIELD(kvmi_get_registers_reply, sregs, 152, 312);
KVMI_ASSERT_FIELD(kvmi_get_registers_reply, msrs, 464, 8);
KVMI_ASSERT(offsetof(struct kvmi_get_registers_reply, msrs.entries) == 472,
            "offsetof kvmi_get_registers_reply.msrs.entries");

KVMI_ASSERT_SIZE(kvmi_get_cpuid, 8);
KVMI_ASSERT_FIELD(kvmi_get_cpuid, function, 0, 4);
KVMI_ASSERT_FIELD(kvmi_get_cpuid, index, 4, 4);

KVMI_ASSERT_SIZE(kvmi_get_cpuid_reply, 16);

KVMI_ASSERT_SIZE(kvmi_control_cr, 8);
KVMI_ASSERT_FIELD(kvmi_control_cr, enable, 0, 1);
KVMI_ASSERT_FIELD(kvmi_control_cr, padding1, 1, 1);
KVMI_ASSERT_FIELD(kvmi_control_cr, padding2, 2, 2);
KVMI_ASSERT_FIELD(kvmi_control_cr, cr, 4, 4);

KVMI_ASSERT_SIZE(kvmi_event_cr, 24);
KVMI_ASSERT_FIELD(kvmi_event_cr, cr, 0, 2);
KVMI_ASSERT_FIELD(kvmi_event_cr, padding, 2, 6);
KVMI_ASSERT_FIELD(kvmi_event_cr, old_value, 8, 8);
KVMI_ASSERT_FIELD(kvmi_event_cr, new_value, 16, 8);

KVMI_ASSERT_SIZE(kvmi_event_cr_reply, 8);

KVMI_ASSERT_SIZE(kvmi_control_msr, 8);
KVMI_ASSERT_FIELD(kvmi_control_msr, enable, 0, 1);
KVMI_ASSERT_FIELD(kvmi_control_msr, msr, 4, 4);

KVMI_ASSERT_SIZE(kvmi_event_msr, 24);
KVMI_ASSERT_FIELD(kvmi_event_msr, msr, 0, 4);
KVMI_ASSERT_FIELD(kvmi_event_msr, padding, 4, 4);
KVMI_ASSERT_FIELD(kvmi_event_msr, old_value, 8, 8);
KVMI_ASSERT_FIELD(kvmi_event_msr, new_value, 16, 8);

KVMI_ASSERT_SIZE(kvmi_event_msr_reply, 8);

KVMI_ASSERT_SIZE(kvmi_get_xsave_reply, 0);

KVMI_ASSERT_SIZE(kvmi_get_mtrr_type, 8);

KVMI_ASSERT_SIZE(kvmi_get_mtrr_type_reply, 8);

KVMI_ASSERT_SIZE(kvmi_event_descriptor, 8);
KVMI_ASSERT_FIELD(kvmi_event_descriptor, descriptor, 0, 1);
KVMI_ASSERT_FIELD(kvmi_event_descriptor, write, 1, 1);
KVMI_ASSERT_FIELD(kvmi_event_descriptor, padding, 2, 6);

KVMI_ASSERT_SIZE(kvm_introspection, 24);
KVMI_ASSERT_FIELD(kvm_introspection, fd, 0, 4);
KVMI_ASSERT_FIELD(kvm_introspection, padding, 4, 4);
KVMI_ASSERT_FIELD(kvm_introspection, uuid, 8, 16);

KVMI_ASSERT_SIZE(kvm_introspection_feature, 8);

KVMI_ASSERT_SIZE(kvmi_qemu2introspector, 96);
KVMI_ASSERT_FIELD(kvmi_qemu2introspector, uuid, 4, 16);
KVMI_ASSERT_FIELD(kvmi_qemu2introspector, padding, 20, 4);
KVMI_ASSERT_FIELD(kvmi_qemu2introspector, start_time, 24, 8);
KVMI_ASSERT_FIELD(kvmi_qemu2introspector, name, 32, 64);

KVMI_ASSERT_SIZE(kvmi_introspector2qemu, 24);
KVMI_ASSERT_FIELD(kvmi_introspector2qemu, cookie_hash, 4, 20);

#endif /* KVMID_KERNEL_UAPI_KVMI_LAYOUT_CHECK_H_ */
