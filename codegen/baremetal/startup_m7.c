/*
 * Start-up for a C package's test program on a Cortex-M7 with semihosting (qemu-system-arm -machine mps2-an500):
 * a vector table, a reset handler that enables the FPU, copies .data, clears .bss (the arena), opens the
 * semihosting console and files (newlib's rdimon) and calls main with the command line the host passed, and a
 * fault handler that reports and exits instead of hanging. Not part of the library: firmware brings its own.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start__, __bss_end__, __stack_top;
extern void initialise_monitor_handles(void);
extern void __libc_init_array(void);
int main(int argc, char **argv);

#define SYS_GET_CMDLINE 0x15

static int semihost(int op, void *arg) {
  register int r0 __asm__("r0") = op;
  register void *r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

static char cmdline[1024];
static char *args[16];

static int split_cmdline(void) {
  struct { char *buf; int len; } block = {cmdline, (int)sizeof cmdline - 1};
  if (semihost(SYS_GET_CMDLINE, &block) != 0) return 0;
  cmdline[block.len] = '\0';
  int argc = 0;
  for (char *p = cmdline; *p && argc < 15;) {
    while (*p == ' ') *p++ = '\0';
    if (!*p) break;
    args[argc++] = p;
    while (*p && *p != ' ') ++p;
  }
  args[argc] = NULL;
  return argc;
}

/* crti/crtn are left out with the C runtime's start-up (-nostartfiles); __libc_init_array still calls these */
void _init(void) {}
void _fini(void) {}

void ep_reset(void) {
  /* CPACR: full access to CP10 and CP11 (the FPU) before any floating-point instruction */
  *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20;
  __asm__ volatile("dsb\n\tisb");
  memcpy(&__data_start, &__data_load, (size_t)((char *)&__data_end - (char *)&__data_start));
  memset(&__bss_start__, 0, (size_t)((char *)&__bss_end__ - (char *)&__bss_start__));
  initialise_monitor_handles();
  __libc_init_array();
  int argc = split_cmdline();
  exit(main(argc, args));
}

/* A fault says where (the stacked PC) and why (CFSR, HFSR, BFAR), then exits rather than hangs the emulator. */
__attribute__((used)) static void ep_fault_report(const uint32_t *frame) {
  volatile uint32_t *scb = (volatile uint32_t *)0xE000ED00;
  fprintf(stderr, "edgeprune: the program faulted at pc 0x%08lx (CFSR 0x%08lx HFSR 0x%08lx BFAR 0x%08lx)\n",
          (unsigned long)frame[6], (unsigned long)scb[0x28 / 4], (unsigned long)scb[0x2C / 4],
          (unsigned long)scb[0x38 / 4]);
  exit(3);
}

__attribute__((naked)) static void ep_fault(void) {
  __asm__ volatile("tst lr, #4\n\tite eq\n\tmrseq r0, msp\n\tmrsne r0, psp\n\tb ep_fault_report");
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))&__stack_top, ep_reset, ep_fault, ep_fault, ep_fault, ep_fault, ep_fault,
};
