/*
 * The agent on a bare-metal board. Link agent.c, this file and the package's library into your firmware, provide
 * the three board functions below, and call ep_agent_serve() from main() once the UART and clocks are set up:
 *
 *   int board_uart_read(uint8_t *buf, size_t n, unsigned timeout_ms);  bytes read (0 after timeout_ms idle), <0 dead
 *   int board_uart_write(const uint8_t *buf, size_t n);                0, or <0 when the link is dead
 *   uint32_t board_cycles(void);   only without EP_DWT: a free-running cycle counter at EP_CPU_HZ
 *
 * Timing: on Cortex-M3/M4/M7/M33 (or with -DEP_DWT) the DWT cycle counter, DWT->CYCCNT, is enabled and read here,
 * with no CMSIS needed. It is 32 bits wide: one inference must take less than 2^32 / EP_CPU_HZ seconds (8.9 s at
 * 480 MHz). Build with -DEP_CPU_HZ=<core clock in Hz>.
 */
#include "agent.h"
#include "protocol.h"

#ifndef EP_CPU_HZ
#error "build with -DEP_CPU_HZ=<core clock in Hz>, e.g. -DEP_CPU_HZ=480000000"
#endif

#if !defined(EP_DWT) && (defined(__ARM_ARCH_7M__) || defined(__ARM_ARCH_7EM__) || defined(__ARM_ARCH_8M_MAIN__))
#define EP_DWT 1
#endif

int board_uart_read(uint8_t *buf, size_t n, unsigned timeout_ms);
int board_uart_write(const uint8_t *buf, size_t n);

#ifdef EP_DWT
#define DEMCR (*(volatile uint32_t *)0xE000EDFCu)      /* CoreDebug->DEMCR */
#define DWT_CTRL (*(volatile uint32_t *)0xE0001000u)   /* DWT->CTRL */
#define DWT_CYCCNT (*(volatile uint32_t *)0xE0001004u) /* DWT->CYCCNT */
#define DWT_LAR (*(volatile uint32_t *)0xE0001FB0u)    /* DWT->LAR: the M7 ignores writes until unlocked */

static uint32_t cycles(void) {
  if (!(DWT_CTRL & 1u)) {
    DEMCR |= 1u << 24; /* TRCENA: power the DWT */
    DWT_LAR = 0xC5ACCE55u;
    DWT_CYCCNT = 0;
    DWT_CTRL |= 1u; /* CYCCNTENA */
  }
  return DWT_CYCCNT;
}
#else
uint32_t board_cycles(void);
static uint32_t cycles(void) { return board_cycles(); }
#endif

static uint32_t start;

int ep_port_read(uint8_t *buf, size_t n) { return board_uart_read(buf, n, 250); }
int ep_port_write(const uint8_t *buf, size_t n) { return board_uart_write(buf, n); }
void ep_port_timer_start(void) { start = cycles(); }
/* Unsigned subtraction is right across one wrap of the counter. */
float ep_port_timer_us(void) { return (float)(uint32_t)(cycles() - start) / ((float)EP_CPU_HZ / 1e6f); }
int ep_port_clock(void) { return EP_CLOCK_CYCLES; }
