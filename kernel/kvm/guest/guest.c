/* kvmi-guest: a small x86-64 kernel for the kvmi-vmm VMM. It sets up long mode (boot.S), a GDT
 * with a TSS, an IDT, SYSCALL (WRMSR STAR/LSTAR/FMASK) and SYSENTER MSRs, then runs rounds of
 * three ring-3 "processes", each with its own page tables, that make system calls. Given
 * "rootkit" on its command line it also, every round, tries what a rootkit does: rewrite LSTAR,
 * patch its own kernel text, overwrite an IDT gate; it reports on the console whether each
 * attempt took effect. Everything it prints is what the end-to-end tests compare with what kvmid
 * reads and reports. Freestanding: no libc, no interrupts (the VMM's sleep port paces it). */
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

#define MSR_SYSENTER_CS 0x174
#define MSR_SYSENTER_ESP 0x175
#define MSR_SYSENTER_EIP 0x176
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_FMASK 0xc0000084

#define USER_BASE 0x8000000000ull /* PML4 slot 1: never overlaps the kernel's identity map */
#define PROCESSES 3
#define PTE_P 0x1ull
#define PTE_W 0x2ull
#define PTE_U 0x4ull

/* ---- symbols from boot.S and the linker script ---- */
extern char ktext_start[], ktext_end[], user_start[], user_end[];
extern uint64_t gdt[];
extern uint64_t kernel_pml4[];
extern const uint64_t vector_table[20];
extern char syscall_stack_top[], boot_stack_top[];
extern void syscall_entry(void);
extern void rootkit_syscall_hook(void);
extern void user_main(void);
extern void enter_process(uint64_t rip, uint64_t rsp, uint64_t arg, uint64_t cs, uint64_t ss);

/* ---- port I/O, MSRs ---- */
static inline void outb(uint16_t port, uint8_t v) {
  __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port));
}
static inline void outl(uint16_t port, uint32_t v) {
  __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port));
}
static inline uint64_t rdmsr(uint32_t msr) {
  uint32_t lo, hi;
  __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
  return ((uint64_t)hi << 32) | lo;
}
/* The one WRMSR the #GP handler may skip (a refused write): its address is wrmsr_site. */
static __attribute__((noinline)) void wrmsr(uint32_t msr, uint64_t value) {
  __asm__ volatile(".globl wrmsr_site\nwrmsr_site: wrmsr\n" ::"c"(msr), "a"((uint32_t)value),
                   "d"((uint32_t)(value >> 32))
                   : "memory");
}
extern char wrmsr_site[];
/* The INT3 that "int3=N" executes every round (kmain). */
extern char int3_site[];
static inline uint64_t rdtsc(void) {
  uint32_t lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((uint64_t)hi << 32) | lo;
}
static inline void write_cr3(uint64_t v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline uint64_t read_cr3(void) {
  uint64_t v;
  __asm__ volatile("mov %%cr3, %0" : "=r"(v));
  return v;
}

/* ---- console ---- */
static void putc_serial(char c) { outb(GUEST_PORT_SERIAL, (uint8_t)c); }
static void puts_serial(const char* s) {
  while (*s) putc_serial(*s++);
}
static void put_hex(uint64_t v) {
  puts_serial("0x");
  int started = 0;
  for (int shift = 60; shift >= 0; shift -= 4) {
    unsigned digit = (v >> shift) & 0xf;
    if (digit || started || shift == 0) {
      putc_serial("0123456789abcdef"[digit]);
      started = 1;
    }
  }
}
static void put_dec(uint64_t v) {
  char buf[24];
  int n = 0;
  do {
    buf[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n) putc_serial(buf[--n]);
}
static void sleep_ms(uint32_t ms) { outl(GUEST_PORT_SLEEP_MS, ms); }

/* ---- command line ---- */
static const char* cmdline;
/* True if `word` appears as a whole space-separated word, or as "word=" (value in *value). */
static int cmdline_has(const char* word, uint64_t* value) {
  const char* p = cmdline;
  while (*p) {
    while (*p == ' ') ++p;
    const char* w = word;
    const char* q = p;
    while (*w && *q == *w) ++q, ++w;
    if (!*w && (*q == ' ' || *q == 0)) return 1;
    if (!*w && *q == '=' && value) {
      uint64_t v = 0;
      for (++q; *q >= '0' && *q <= '9'; ++q) v = v * 10 + (uint64_t)(*q - '0');
      *value = v;
      return 1;
    }
    while (*p && *p != ' ') ++p;
  }
  return 0;
}

/* ---- descriptor tables ---- */
struct idt_gate {
  uint16_t offset_low, selector;
  uint8_t ist, type_attr;
  uint16_t offset_mid;
  uint32_t offset_high, zero;
};
/* The IDT fills exactly one page, so protecting it does not protect anything else. */
static struct idt_gate idt[256] __attribute__((aligned(4096), section(".data.idt")));
static struct {
  uint32_t reserved0;
  uint64_t rsp0, rsp1, rsp2, reserved1, ist[7], reserved2;
  uint16_t reserved3, iomap;
} __attribute__((packed)) tss;
static uint8_t trap_stack[8192] __attribute__((aligned(16)));

static void set_gate(int vector, uint64_t handler) {
  idt[vector].offset_low = (uint16_t)handler;
  idt[vector].selector = 0x08;
  idt[vector].ist = 0;
  idt[vector].type_attr = 0x8e; /* present, DPL 0, interrupt gate */
  idt[vector].offset_mid = (uint16_t)(handler >> 16);
  idt[vector].offset_high = (uint32_t)(handler >> 32);
  idt[vector].zero = 0;
}

static void setup_descriptors(void) {
  uint64_t base = (uint64_t)&tss;
  tss.rsp0 = (uint64_t)(trap_stack + sizeof(trap_stack));
  tss.iomap = sizeof(tss);
  gdt[5] = (sizeof(tss) - 1) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
           (((base >> 24) & 0xff) << 56);
  gdt[6] = base >> 32;
  __asm__ volatile("ltr %w0" ::"r"(0x28));
  for (int v = 0; v < 20; ++v) set_gate(v, vector_table[v]);
  struct {
    uint16_t limit;
    uint64_t base;
  } __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint64_t)idt};
  __asm__ volatile("lidt %0" ::"m"(idtr));
}

/* ---- traps ---- */
struct trap_frame {
  uint64_t r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
  uint64_t vector, error_code;
  uint64_t rip, cs, rflags, rsp, ss;
};
static uint64_t gp_faults_on_wrmsr;

void trap_dispatch(struct trap_frame* f) {
  if (f->vector == 3) {
    /* #BP is a trap: RIP is already past the INT3. */
    puts_serial("trap: #BP at rip=");
    put_hex(f->rip - 1);
    puts_serial("\n");
    return;
  }
  if (f->vector == 13 && f->rip == (uint64_t)wrmsr_site) {
    /* A refused WRMSR (the VMM answered the MSR exit with an error): skip it, as an OS would
     * after logging. */
    ++gp_faults_on_wrmsr;
    puts_serial("trap: #GP on wrmsr ecx=");
    put_hex(f->rcx);
    puts_serial("\n");
    f->rip += 2;
    return;
  }
  puts_serial("trap: unexpected vector ");
  put_dec(f->vector);
  puts_serial(" error ");
  put_hex(f->error_code);
  puts_serial(" at rip=");
  put_hex(f->rip);
  puts_serial(" cs=");
  put_hex(f->cs);
  uint64_t cr2;
  __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
  puts_serial(" cr2=");
  put_hex(cr2);
  puts_serial(" rsp=");
  put_hex(f->rsp);
  puts_serial(" rcx=");
  put_hex(f->rcx);
  puts_serial(" rax=");
  put_hex(f->rax);
  puts_serial("; halting\n");
  for (;;) __asm__ volatile("cli; hlt");
}

/* ---- processes ---- */
struct process {
  uint64_t pml4[512], pdpt[512], pd[512], pt[512];
  uint8_t stack[4096];
};
static struct process processes[PROCESSES] __attribute__((aligned(4096)));
static uint64_t current_pid;
static int ring3;
uint64_t process_cs; /* read by syscall_entry: how to return */
static uint64_t syscalls_handled;

static void setup_process(struct process* p) {
  p->pml4[0] = kernel_pml4[0]; /* the kernel (supervisor only: no U bit) */
  p->pml4[1] = (uint64_t)p->pdpt | PTE_P | PTE_W | PTE_U;
  p->pdpt[0] = (uint64_t)p->pd | PTE_P | PTE_W | PTE_U;
  p->pd[0] = (uint64_t)p->pt | PTE_P | PTE_W | PTE_U;
  p->pt[0] = (uint64_t)user_start | PTE_P | PTE_U; /* the program, read-only */
  p->pt[1] = (uint64_t)p->stack | PTE_P | PTE_W | PTE_U;
}

uint64_t sys_getpid(void) __attribute__((noinline, aligned(16)));
uint64_t sys_getpid(void) { return current_pid; }

/* Called by syscall_entry; a negative result means "the process exited". */
int64_t syscall_dispatch(uint64_t a0, uint64_t a1, uint64_t a2, uint64_t nr) {
  ++syscalls_handled;
  switch (nr) {
    case 1: { /* write(buf, len, pid): only from the process's own program page */
      if (a0 < USER_BASE || a1 > 128 || a0 + a1 > USER_BASE + 4096) return -22;
      puts_serial("proc ");
      put_dec(a2);
      puts_serial(": cr3=");
      put_hex(read_cr3());
      puts_serial(" ");
      for (uint64_t i = 0; i < a1; ++i) putc_serial(((const char*)a0)[i]);
      puts_serial("\n");
      return (int64_t)a1;
    }
    case 39:
      return (int64_t)sys_getpid();
    case 60:
      return -1; /* syscall_entry switches back to the kernel */
  }
  return -38; /* ENOSYS */
}

static void run_process(uint64_t pid) {
  struct process* p = &processes[pid];
  current_pid = pid;
  uint64_t kernel_cr3 = read_cr3();
  write_cr3((uint64_t)p->pml4);
  /* Ring 3 on request only: on this project's KVM host SYSCALL from ring 3 does not arrive in
   * ring 0 (docs/KVM.md), so by default a process runs in ring 0, still in its own address space,
   * and enters the kernel with SYSCALL all the same. */
  process_cs = ring3 ? 0x23 : 0x08;
  enter_process(USER_BASE + ((uint64_t)user_main - (uint64_t)user_start), USER_BASE + 2 * 4096, pid,
                process_cs, ring3 ? 0x1b : 0x10);
  write_cr3(kernel_cr3);
}

/* A system call from the kernel itself (ring 0, so syscall_entry returns with a jump). */
static uint64_t kernel_syscall(uint64_t nr) {
  process_cs = 0x08;
  __asm__ volatile("syscall" : "+a"(nr) : : "rcx", "r11", "memory");
  return nr;
}

/* ---- integrity ---- */
static uint64_t ktext_checksum(void) {
  uint64_t sum = 0xcbf29ce484222325ull; /* FNV-1a */
  for (const volatile uint8_t* p = (const uint8_t*)ktext_start; p < (const uint8_t*)ktext_end;
       ++p) {
    sum = (sum ^ *p) * 0x100000001b3ull;
  }
  return sum;
}

/* ---- the rootkit ---- */
uint64_t rootkit_hooked_syscalls;
static uint64_t expected_lstar;

static void report(uint64_t round, const char* what, uint64_t where, const char* outcome) {
  puts_serial("rootkit: attempt ");
  put_dec(round);
  puts_serial(what);
  put_hex(where);
  puts_serial(outcome);
}

/* Each attack is observed and undone before anything is printed: while nothing intercepts them,
 * no instruction between an attack and its undo exits to the VMM, so a tool that hooks the guest
 * later never finds (and locks in) a half-done attack. */
static void rootkit_attempt(uint64_t round) {
  /* 1. Hook the syscall entry and make one system call through whatever LSTAR now says. */
  uint64_t hooked_before = rootkit_hooked_syscalls;
  wrmsr(MSR_LSTAR, (uint64_t)rootkit_syscall_hook);
  uint64_t lstar = rdmsr(MSR_LSTAR);
  kernel_syscall(39);
  uint64_t hooked = rootkit_hooked_syscalls - hooked_before;
  if (lstar != expected_lstar) wrmsr(MSR_LSTAR, expected_lstar);

  /* 2. Patch kernel text: sys_getpid becomes "mov $0x1337, %eax; ret". */
  volatile uint64_t* target = (volatile uint64_t*)(uintptr_t)sys_getpid;
  uint64_t original = *target;
  uint64_t patched = (original & ~0xffffffffffffull) | 0xc300001337b8ull;
  *target = patched;
  uint64_t text_now = *target;
  uint64_t getpid = sys_getpid();
  if (text_now != original) *target = original;

  /* 3. Redirect the #BP gate of the IDT to the syscall hook. */
  volatile uint64_t* gate = (volatile uint64_t*)&idt[3];
  uint64_t gate_before = *gate;
  uint64_t gate_evil = (gate_before & ~0xffffull) | ((uint64_t)rootkit_syscall_hook & 0xffff);
  if (gate_evil == gate_before) gate_evil ^= 0x10;
  *gate = gate_evil;
  uint64_t gate_now = *gate;
  if (gate_now != gate_before) *gate = gate_before;

  report(round, " lstar <- ", (uint64_t)rootkit_syscall_hook,
         lstar == (uint64_t)rootkit_syscall_hook ? ": HIJACKED" : ": blocked");
  puts_serial(" (lstar=");
  put_hex(lstar);
  puts_serial(", syscalls through the hook: ");
  put_dec(hooked);
  puts_serial(")\n");
  report(round, " ktext patch at ", (uint64_t)target,
         text_now == patched ? ": PATCHED" : ": blocked");
  puts_serial(" (getpid=");
  put_hex(getpid);
  puts_serial(")\n");
  report(round, " idt write at ", (uint64_t)gate,
         gate_now == gate_evil ? ": OVERWRITTEN" : ": blocked");
  puts_serial("\n");
}

/* r15 is reserved (-ffixed-r15) and holds this value from boot on: whenever the vCPU is paused,
 * GET_REGISTERS must show it. */
static uint64_t boot_r15(void) { return 0x6b766d6900000000ull | (rdtsc() & 0xffffffffull); }

/* A page of guest memory whose content the tests read through kvmid. */
static uint64_t marker[512] __attribute__((aligned(4096)));

/* ---- application processors ---- */
static uint8_t ap_stacks[GUEST_MAX_VCPUS - 1][GUEST_AP_STACK_SIZE] __attribute__((aligned(16)));
static uint64_t ap_period_ms = 100;

/* An AP (started by the VMM, see layout.h) reports itself, then ticks every period: something
 * per-vCPU for the tool to pause and inspect. It touches no shared kernel state. */
static void ap_main(uint64_t cpu) {
  puts_serial("ap ");
  put_dec(cpu);
  puts_serial(": up\n");
  for (uint64_t tick = 1;; ++tick) {
    sleep_ms((uint32_t)ap_period_ms);
    puts_serial("ap ");
    put_dec(cpu);
    puts_serial(": tick ");
    put_dec(tick);
    puts_serial("\n");
  }
}

void kmain(uint32_t cmdline_gpa) {
  cmdline = (const char*)(uintptr_t)cmdline_gpa;
  uint64_t r15 = boot_r15();
  __asm__ volatile("mov %0, %%r15" ::"r"(r15));
  puts_serial("boot: long mode, paging on, cmdline \"");
  puts_serial(cmdline);
  puts_serial("\"\n");

  setup_descriptors();
  wrmsr(MSR_STAR, (0x10ull << 48) | (0x08ull << 32));
  wrmsr(MSR_LSTAR, (uint64_t)syscall_entry);
  wrmsr(MSR_FMASK, 0x700); /* TF, IF, DF */
  wrmsr(MSR_SYSENTER_CS, 0x08);
  wrmsr(MSR_SYSENTER_ESP, (uint64_t)syscall_stack_top);
  wrmsr(MSR_SYSENTER_EIP, (uint64_t)syscall_entry);
  expected_lstar = (uint64_t)syscall_entry;
  for (int i = 0; i < PROCESSES; ++i) setup_process(&processes[i]);
  for (int i = 0; i < 512; ++i) marker[i] = r15 ^ (uint64_t)i * 0x9e3779b97f4a7c15ull;

  uint64_t ktext_sum = ktext_checksum();
  puts_serial("layout: ktext=");
  put_hex((uint64_t)ktext_start);
  puts_serial("-");
  put_hex((uint64_t)ktext_end - 1);
  puts_serial(" idt=");
  put_hex((uint64_t)idt);
  puts_serial(" sys_getpid=");
  put_hex((uint64_t)sys_getpid);
  puts_serial(" lstar=");
  put_hex(rdmsr(MSR_LSTAR));
  puts_serial(" marker=");
  put_hex((uint64_t)marker);
  puts_serial(" int3_site=");
  put_hex((uint64_t)int3_site);
  puts_serial(" marker0=");
  put_hex(marker[0]);
  puts_serial(" r15=");
  put_hex(r15);
  puts_serial(" ktext_sum=");
  put_hex(ktext_sum);
  puts_serial(" cr3=");
  put_hex(read_cr3());
  puts_serial(" star=");
  put_hex(rdmsr(MSR_STAR));
  puts_serial(" efer=");
  put_hex(rdmsr(0xc0000080));
  puts_serial("\n");

  uint64_t period_ms = 100;
  cmdline_has("period_ms", &period_ms);
  ap_period_ms = period_ms;
  __asm__ volatile("outb %%al, %%dx" ::"a"(1), "d"(GUEST_PORT_BOOTED), "D"(ap_main),
                   "S"(ap_stacks)
                   : "memory");
  const int rootkit = cmdline_has("rootkit", 0);
  ring3 = cmdline_has("ring3", 0);
  uint64_t int3_from = 0; /* "int3=N": an INT3 in every round from round N on */
  cmdline_has("int3", &int3_from);
  uint64_t bench = 0; /* "bench=N": batches of N LSTAR hijack attempts, timed, nothing else */
  if (cmdline_has("bench", &bench) && bench) {
    for (;;) {
      uint64_t start = rdtsc();
      for (uint64_t i = 0; i < bench; ++i) {
        wrmsr(MSR_LSTAR, (uint64_t)rootkit_syscall_hook);
        if (rdmsr(MSR_LSTAR) != expected_lstar) wrmsr(MSR_LSTAR, expected_lstar);
      }
      uint64_t cycles = rdtsc() - start;
      puts_serial("bench: ");
      put_dec(bench);
      puts_serial(" attempts in ");
      put_dec(cycles);
      puts_serial(" cycles\n");
    }
  }
  for (uint64_t round = 1;; ++round) {
    for (uint64_t pid = 0; pid < PROCESSES; ++pid) run_process(pid);
    if (rootkit) rootkit_attempt(round);
    if (int3_from && round >= int3_from) {
      puts_serial("int3: executing\n");
      __asm__ volatile(".globl int3_site\nint3_site: int3");
      puts_serial("int3: done\n");
    }
    puts_serial("round ");
    put_dec(round);
    puts_serial(": syscalls=");
    put_dec(syscalls_handled);
    puts_serial(" lstar=");
    put_hex(rdmsr(MSR_LSTAR));
    puts_serial(" ktext_sum=");
    put_hex(ktext_checksum());
    puts_serial(ktext_checksum() == ktext_sum ? " (unchanged)" : " (CHANGED)");
    puts_serial(" marker0=");
    put_hex(*(volatile uint64_t*)&marker[0]);
    puts_serial(" gp_on_wrmsr=");
    put_dec(gp_faults_on_wrmsr);
    puts_serial("\n");
    sleep_ms((uint32_t)period_ms);
  }
}
