/* The contract between the VMM (kvm_vm.cc) and the guest (boot.S, guest.c): where things are in
 * guest-physical memory and which I/O ports mean what. Included from C, assembly and C++. */
#ifndef KVMID_KERNEL_KVM_GUEST_LAYOUT_H_
#define KVMID_KERNEL_KVM_GUEST_LAYOUT_H_

/* The image is loaded here and entered in 32-bit protected mode (flat segments, paging off). */
#define GUEST_LOAD_GPA 0x100000
/* Fixed regions (guest.ld) that policies protect: kernel text, and the IDT alone in its page. */
#define GUEST_KTEXT_FIRST 0x101000
#define GUEST_KTEXT_LAST 0x10ffff
#define GUEST_IDT_GPA 0x111000

/* Zero-terminated command line written by the VMM; its address is in EBX at entry. */
#define GUEST_CMDLINE_GPA 0x8000
#define GUEST_CMDLINE_MAX 256

/* 16550 transmit register: each OUTB is one console byte. */
#define GUEST_PORT_SERIAL 0x3f8
/* OUTL n: the vCPU sleeps n milliseconds in the VMM (a stand-in for HLT + a timer interrupt,
 * during which the VMM serves introspection commands for this vCPU). */
#define GUEST_PORT_SLEEP_MS 0x510

/* OUTB: the kernel finished setting itself up (IDT, MSRs, page tables). kvmi-vmm connects to the
 * introspection tool only then (unless told otherwise), so the tool's protections, which it arms
 * as soon as it hooks, apply to the running kernel and not to its initialisation. */
#define GUEST_PORT_BOOTED 0x511
/* At that OUTB, RDI is the entry of the application processors (vCPUs 1..GUEST_MAX_VCPUS-1) and
 * RSI the base of their stacks, GUEST_AP_STACK_SIZE bytes each, vCPU i's ending at
 * RSI + i * GUEST_AP_STACK_SIZE. kvmi-vmm starts each AP there in 64-bit mode with the kernel's
 * page tables, GDT, IDT and TSS (as the BSP has them at that OUTB), its index in RDI. */
#define GUEST_MAX_VCPUS 8
#define GUEST_AP_STACK_SIZE 8192

#endif /* KVMID_KERNEL_KVM_GUEST_LAYOUT_H_ */
