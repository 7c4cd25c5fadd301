/*
 * The edgeprune serial agent: serves one C package over a byte stream with the protocol in protocol.h.
 *
 * agent.c is the portable part (framing, CRC, requests). A port supplies the byte stream and the clock:
 *   port_posix.c      Linux and qemu-user: stdin/stdout or a tty given on the command line, clock_gettime
 *   port_baremetal.c  a board: your UART read/write functions, DWT->CYCCNT (Cortex-M) or your cycle counter
 */
#ifndef EP_AGENT_H_
#define EP_AGENT_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Read up to n bytes, waiting for at least one. Returns the count; 0 when the line stayed idle for a while (the
 * agent then drops a half-received frame, so a host that died mid-frame does not wedge it); <0 when the link is
 * gone (ep_agent_serve returns). A port that cannot tell idleness may simply block. */
int ep_port_read(uint8_t *buf, size_t n);

/* Write all n bytes; <0 when the link is gone. */
int ep_port_write(const uint8_t *buf, size_t n);

/* Timing of one inference: start, then microseconds since the start. */
void ep_port_timer_start(void);
float ep_port_timer_us(void);

/* Which clock ep_port_timer_us reads: EP_CLOCK_MONOTONIC or EP_CLOCK_CYCLES (protocol.h). */
int ep_port_clock(void);

/* Answer requests until ep_port_read reports the link gone. */
void ep_agent_serve(void);

#ifdef __cplusplus
}
#endif
#endif /* EP_AGENT_H_ */
