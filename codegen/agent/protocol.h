/*
 * The edgeprune serial protocol, version 1: a host (edgeprune.measure.serial_device) drives an agent that runs one
 * C package on a board. One request, one reply; the reply carries the request's sequence number.
 *
 * Frame (integers little-endian):
 *   magic  2   0xA5 0x50
 *   type   1   EP_MSG_*
 *   seq    1   chosen by the host; the agent echoes it
 *   len    2   payload bytes, at most the agent's EP_MAX_PAYLOAD (announced in HELLO)
 *   payload len
 *   crc    4   CRC-32 (IEEE 802.3, as zlib.crc32) of type, seq, len and payload
 *
 * Requests and replies:
 *   HELLO       -                          -> HELLO_OK  u16 version, u16 max payload, u32 input bytes,
 *                                                       u32 output bytes, u8 clock (EP_CLOCK_*), u8 n, n bytes id
 *                                                       (cut to what the frame holds: then the host refuses it)
 *   SET_INPUT   u32 offset, data           -> ACK       u32 offset + data length
 *   RUN         u16 runs, u16 warmup       -> PROGRESS  u16 runs done (warm-up included), every EP_HEARTBEAT_US
 *               (runs + warmup at most                  of runs: rising, and below runs + warmup; then
 *               EP_MAX_RUN_TOTAL)
 *                                             TIMES     u16 n, n x f32 microseconds (warm-up runs not included)
 *   GET_OUTPUT  u32 offset, u16 length     -> OUTPUT    u32 offset, data
 *   anything that fails                    -> ERROR     u8 code (EP_ERR_*), u8 seq of the frame it is about,
 *                                                       message (ASCII, at most EP_MAX_MESSAGE bytes)
 *
 * The agent hunts for the magic, so it resynchronises after noise. A frame with a bad CRC gets ERROR BAD_CRC; one
 * longer than EP_MAX_PAYLOAD gets ERROR TOO_LONG; in both cases the agent hunts again through the rejected bytes
 * (a good frame may start inside them) and the host resends (with a new seq) a bounded number of times. Every
 * request is idempotent, so a resend after a lost reply is harmless.
 *
 * What the host trusts (a board may be broken or hostile; every wait is bounded, every failure one line):
 *   - PROGRESS only for the RUN it is waiting for, only with a count that rises and stays below runs + warmup, and
 *     never past timeout + (runs + warmup) x the host's bound on one run;
 *   - BAD_CRC or TOO_LONG naming another seq only once the line has gone quiet with no reply to its request (the
 *     seq byte may be the damaged one; otherwise the error is about a frame queued ahead);
 *   - times only when finite and positive;
 *   - text (ERROR messages, the build id) only as printable ASCII, cut short.
 */
#ifndef EP_PROTOCOL_H_
#define EP_PROTOCOL_H_

#define EP_PROTOCOL_VERSION 1
#define EP_MAGIC0 0xA5
#define EP_MAGIC1 0x50
#define EP_HEADER_BYTES 6 /* magic, type, seq, len */
#define EP_CRC_BYTES 4

/* Frame buffers are static: 2 x (this + 10) bytes of RAM. Override with -DEP_MAX_PAYLOAD=N (64..4096). */
#ifndef EP_MAX_PAYLOAD
#define EP_MAX_PAYLOAD 1024
#endif
#if EP_MAX_PAYLOAD < 64 || EP_MAX_PAYLOAD > 4096
#error "EP_MAX_PAYLOAD must be within 64..4096 (the host accepts at most 4096)"
#endif
#define EP_MAX_MESSAGE 60
#define EP_MAX_RUN_TOTAL 65535 /* runs + warmup of one RUN: what PROGRESS's u16 count can say */
#ifndef EP_HEARTBEAT_US
#define EP_HEARTBEAT_US 500000.0f /* the host restarts its per-run deadline on each PROGRESS */
#endif

enum {
  EP_MSG_HELLO = 0x01,
  EP_MSG_SET_INPUT = 0x02,
  EP_MSG_RUN = 0x03,
  EP_MSG_GET_OUTPUT = 0x04,
  EP_MSG_ERROR = 0x7F,
  EP_MSG_ACK = 0x80,
  EP_MSG_HELLO_OK = 0x81,
  EP_MSG_TIMES = 0x83,
  EP_MSG_OUTPUT = 0x84,
  EP_MSG_PROGRESS = 0x85
};

enum {
  EP_ERR_BAD_CRC = 1,      /* the frame named by seq arrived damaged: resend it */
  EP_ERR_TOO_LONG = 2,     /* its length exceeds EP_MAX_PAYLOAD */
  EP_ERR_UNKNOWN_TYPE = 3, /* not a request this agent knows */
  EP_ERR_BAD_ARGS = 4,     /* offsets or counts out of range, or a payload of the wrong size */
  EP_ERR_MODEL_FAILED = 5, /* the package's run returned a kernel error */
  EP_ERR_NO_INPUT = 6      /* RUN before the whole input was set */
};

enum {
  EP_CLOCK_MONOTONIC = 0, /* an OS monotonic clock (clock_gettime) */
  EP_CLOCK_CYCLES = 1     /* a CPU cycle counter divided by the core clock (DWT->CYCCNT on Cortex-M) */
};

#endif /* EP_PROTOCOL_H_ */
