/* Guest entry: 32-bit protected mode (as the VMM starts it) -> 64-bit long mode with paging, then
 * kmain(cmdline). Also the syscall entry (LSTAR target), the user-mode switch and the interrupt
 * stubs, which need exact register control. */
#include "layout.h"

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define TSS_SEL 0x28

  .section .note.GNU-stack, "", @progbits

  .section .boot, "ax"
  .code32
  .globl _start
_start:
  cli
  mov %ebx, %esi                 /* command line (GUEST_CMDLINE_GPA) */
  lgdt gdt_pointer32

  /* Identity map of the first 1 GiB with 2 MiB pages: PML4[0] -> PDPT[0] -> PD. */
  mov $kernel_pd, %edi
  xor %ecx, %ecx
1:
  mov %ecx, %eax
  shl $21, %eax
  or $0x83, %eax                 /* present | writable | 2 MiB page */
  mov %eax, (%edi, %ecx, 8)
  movl $0, 4(%edi, %ecx, 8)
  inc %ecx
  cmp $512, %ecx
  jne 1b
  mov $kernel_pd, %eax
  or $0x3, %eax
  mov %eax, kernel_pdpt
  mov $kernel_pdpt, %eax
  or $0x3, %eax
  mov %eax, kernel_pml4

  mov %cr4, %eax
  or $0x40620, %eax              /* PAE | OSFXSR | OSXMMEXCPT | OSXSAVE */
  mov %eax, %cr4
  mov $kernel_pml4, %eax
  mov %eax, %cr3
  mov $0xc0000080, %ecx          /* EFER: LME | SCE | NXE */
  rdmsr
  or $0x901, %eax
  wrmsr
  mov %cr0, %eax
  or $0x80010001, %eax           /* PG | WP | PE */
  and $0x9fffffff, %eax          /* caches on (CD, NW clear) */
  mov %eax, %cr0
  ljmp $KERNEL_CS, $long_mode

  .code64
long_mode:
  mov $KERNEL_DS, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  mov %ax, %fs
  mov %ax, %gs
  lgdt gdt_pointer64             /* 64-bit base (the same table) */
  mov $boot_stack_top, %rsp
  mov %esi, %edi
  xor %ebp, %ebp
  call kmain
2:
  hlt
  jmp 2b

/* ---- user mode ------------------------------------------------------------------------------ */
  .text
/* void enter_process(uint64_t rip, uint64_t rsp, uint64_t arg, uint64_t cs, uint64_t ss): saves
 * the kernel context (callee-saved registers and RSP) and IRETs into the process; returns when the
 * process calls exit. */
  .globl enter_process
enter_process:
  push %rbp
  push %rbx
  push %r12
  push %r13
  push %r14
  mov %rsp, kernel_saved_rsp
  push %r8                       /* SS */
  push %rsi                      /* RSP */
  pushq $0x2                     /* RFLAGS: interrupts stay off, the guest has no timer */
  push %rcx                      /* CS */
  push %rdi                      /* RIP */
  mov %rdx, %rdi
  iretq

/* The process exited: back into enter_process's caller (the syscall stack is abandoned). */
  .globl exit_to_kernel
exit_to_kernel:
  mov kernel_saved_rsp, %rsp
  pop %r14
  pop %r13
  pop %r12
  pop %rbx
  pop %rbp
  ret

/* LSTAR target (what the rootkit wants to replace). Single vCPU, interrupts off: a global scratch
 * slot for the process's RSP suffices. */
  .globl syscall_entry
syscall_entry:
  mov %rsp, user_saved_rsp
  mov $syscall_stack_top, %rsp
  push %rcx
  push %r11
  push %rdi
  push %rsi
  push %rdx
  push %r8
  push %r9
  push %r10
  mov %rax, %rcx                 /* syscall_dispatch(rdi, rsi, rdx, nr) */
  call syscall_dispatch
  cmp $0, %rax
  jl exit_to_kernel
  pop %r10
  pop %r9
  pop %r8
  pop %rdx
  pop %rsi
  pop %rdi
  pop %r11
  pop %rcx
  mov user_saved_rsp, %rsp
  /* Back to the process: SYSRET if it runs in ring 3, else restore RFLAGS and jump (SYSRET
   * always returns to ring 3). */
  testb $3, process_cs
  jz 4f
  sysretq
4:
  push %r11
  popfq
  jmp *%rcx

/* ---- interrupts ----------------------------------------------------------------------------- */
/* Every vector pushes a fake error code when the CPU does not, then its number, and calls
 * trap_dispatch(frame); the C side may change frame->rip. */
.macro VECTOR n
  .globl vector_\n
vector_\n:
  .if (\n != 8 && \n != 10 && \n != 11 && \n != 12 && \n != 13 && \n != 14 && \n != 17)
  push $0
  .endif
  push $\n
  jmp trap_common
.endm
  VECTOR 0
  VECTOR 1
  VECTOR 2
  VECTOR 3
  VECTOR 4
  VECTOR 5
  VECTOR 6
  VECTOR 7
  VECTOR 8
  VECTOR 9
  VECTOR 10
  VECTOR 11
  VECTOR 12
  VECTOR 13
  VECTOR 14
  VECTOR 15
  VECTOR 16
  VECTOR 17
  VECTOR 18
  VECTOR 19

trap_common:
  push %rax
  push %rcx
  push %rdx
  push %rsi
  push %rdi
  push %r8
  push %r9
  push %r10
  push %r11
  mov %rsp, %rdi
  call trap_dispatch
  pop %r11
  pop %r10
  pop %r9
  pop %r8
  pop %rdi
  pop %rsi
  pop %rdx
  pop %rcx
  pop %rax
  add $16, %rsp                  /* vector, error code */
  iretq

  .section .rodata
  .globl vector_table
vector_table:
  .quad vector_0, vector_1, vector_2, vector_3, vector_4, vector_5, vector_6, vector_7
  .quad vector_8, vector_9, vector_10, vector_11, vector_12, vector_13, vector_14, vector_15
  .quad vector_16, vector_17, vector_18, vector_19

/* ---- descriptor tables ---------------------------------------------------------------------- */
  .data
  .align 16
  .globl gdt
gdt:
  .quad 0                        /* 0x00 */
  .quad 0x00af9a000000ffff       /* 0x08 kernel code, 64-bit */
  .quad 0x00cf92000000ffff       /* 0x10 kernel data */
  .quad 0x00cff2000000ffff       /* 0x18 user data (SYSRET SS = STAR[63:48] + 8) */
  .quad 0x00affa000000ffff       /* 0x20 user code, 64-bit (SYSRET CS = STAR[63:48] + 16) */
  .quad 0, 0                     /* 0x28 TSS, filled by kmain */
gdt_end:
gdt_pointer32:
  .word gdt_end - gdt - 1
  .long gdt
gdt_pointer64:
  .word gdt_end - gdt - 1
  .quad gdt

  .bss
  .align 4096
kernel_pml4: .skip 4096
kernel_pdpt: .skip 4096
kernel_pd: .skip 4096
  .globl kernel_pml4
  .skip 16384
boot_stack_top:
  .skip 8192
syscall_stack_top:
  .globl syscall_stack_top
  .globl boot_stack_top
user_saved_rsp: .quad 0
kernel_saved_rsp: .quad 0

/* ---- the user program ----------------------------------------------------------------------- */
/* Runs at USER_BASE (the page is mapped there, not where it was linked), so it only uses
 * RIP-relative addressing. RDI = process number. */
  .section .user_text, "ax"
  .globl user_main
user_main:
  mov %rdi, %r12
  mov $3, %r13
1:
  lea user_greeting(%rip), %rdi
  mov $(user_greeting_end - user_greeting), %rsi
  mov %r12, %rdx
  mov $1, %eax                   /* SYS_WRITE(buf, len, pid) */
  syscall
  mov $39, %eax                  /* SYS_GETPID */
  syscall
  dec %r13
  jnz 1b
  mov $60, %eax                  /* SYS_EXIT */
  syscall
3:
  jmp 3b
user_greeting:
  .ascii "hello from its own address space"
user_greeting_end:

/* The rootkit's syscall hook: counts, then chains to the real entry. */
  .text
  .globl rootkit_syscall_hook
rootkit_syscall_hook:
  lock incq rootkit_hooked_syscalls
  jmp syscall_entry
