/*
 * The portable half of the edgeprune serial agent: frames in and out, CRC-32, and the four requests of
 * protocol.h, over one C package. Static buffers only: the input and output are sized by the package header, the
 * frame buffers by EP_MAX_PAYLOAD. Assumes a little-endian core (all ARM profiles edgeprune targets are).
 *
 * Build with the package's include directory and names (the Makefile does this):
 *   -I<package> -DEP_PKG_HEADER='"net.h"' -DEP_PKG_RUN=net_run -DEP_PKG_LAST_ERROR=net_last_error -DEP_PKG_UPPER=NET
 */
#include "agent.h"

#include <string.h>

#include "protocol.h"

#if !defined(EP_PKG_HEADER) || !defined(EP_PKG_RUN) || !defined(EP_PKG_LAST_ERROR) || !defined(EP_PKG_UPPER)
#error "define EP_PKG_HEADER, EP_PKG_RUN, EP_PKG_LAST_ERROR and EP_PKG_UPPER (see codegen/agent/Makefile)"
#endif
#include EP_PKG_HEADER

/* NET_BUILD_ID etc. from the package's upper-case prefix: pasted after expansion, hence two levels. */
#define EP_PASTE_(a, b) a##b
#define EP_PASTE(a, b) EP_PASTE_(a, b)
#define PKG_BUILD_ID EP_PASTE(EP_PKG_UPPER, _BUILD_ID)
#define PKG_INPUT_SIZE EP_PASTE(EP_PKG_UPPER, _INPUT_SIZE)
#define PKG_OUTPUT_SIZE EP_PASTE(EP_PKG_UPPER, _OUTPUT_SIZE)

#define INPUT_BYTES ((uint32_t)PKG_INPUT_SIZE * 4u)
#define OUTPUT_BYTES ((uint32_t)PKG_OUTPUT_SIZE * 4u)
#define FRAME_BYTES (EP_HEADER_BYTES + EP_MAX_PAYLOAD + EP_CRC_BYTES)
#define MAX_RUNS ((EP_MAX_PAYLOAD - 2) / 4) /* one TIMES reply holds them all */

static float input[PKG_INPUT_SIZE], output[PKG_OUTPUT_SIZE];
static uint32_t input_set; /* bytes of the input set so far, from offset 0 without gaps */
static float times_us[MAX_RUNS];
static uint8_t rx[FRAME_BYTES], tx[FRAME_BYTES];
static size_t rx_len;
static int link_lost;

/* ---- CRC-32 (IEEE 802.3, reflected, as zlib.crc32): bitwise, so no 1 KB table in a small MCU's flash */
static uint32_t crc32(const uint8_t *p, size_t n) {
  uint32_t crc = 0xFFFFFFFFu;
  while (n--) {
    crc ^= *p++;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, v); put16(p + 2, v >> 16); }
static uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }
static uint32_t get32(const uint8_t *p) { return get16(p) | get16(p + 2) << 16; }

#define TX_PAYLOAD (tx + EP_HEADER_BYTES)

/* Send the frame whose payload handlers already wrote at TX_PAYLOAD. */
static void send(uint8_t type, uint8_t seq, size_t len) {
  tx[0] = EP_MAGIC0;
  tx[1] = EP_MAGIC1;
  tx[2] = type;
  tx[3] = seq;
  put16(tx + 4, (uint32_t)len);
  put32(tx + EP_HEADER_BYTES + len, crc32(tx + 2, 4 + len));
  if (ep_port_write(tx, EP_HEADER_BYTES + len + EP_CRC_BYTES) < 0) link_lost = 1;
}

static void send_error(uint8_t seq, uint8_t code, const char *msg, const char *detail) {
  size_t n = 2;
  TX_PAYLOAD[0] = code;
  TX_PAYLOAD[1] = seq;
  const char *parts[2] = {msg, detail};
  for (int i = 0; i < 2; ++i)
    for (const char *c = parts[i]; c && *c && n < 2 + EP_MAX_MESSAGE; ++c) TX_PAYLOAD[n++] = (uint8_t)*c;
  send(EP_MSG_ERROR, seq, n);
}

/* The id's room in HELLO_OK: what the frame holds after the 14 bytes before it, and what its u8 length can say. */
#define ID_ROOM (EP_MAX_PAYLOAD - 14 < 255 ? EP_MAX_PAYLOAD - 14 : 255)

static void hello(uint8_t seq) {
  const char *id = PKG_BUILD_ID;
  size_t n = strlen(id) > ID_ROOM ? ID_ROOM : strlen(id); /* a cut id does not match the host's: it refuses it */
  input_set = 0; /* a new session sends its input again */
  put16(TX_PAYLOAD, EP_PROTOCOL_VERSION);
  put16(TX_PAYLOAD + 2, EP_MAX_PAYLOAD);
  put32(TX_PAYLOAD + 4, INPUT_BYTES);
  put32(TX_PAYLOAD + 8, OUTPUT_BYTES);
  TX_PAYLOAD[12] = (uint8_t)ep_port_clock();
  TX_PAYLOAD[13] = (uint8_t)n;
  memcpy(TX_PAYLOAD + 14, id, n);
  send(EP_MSG_HELLO_OK, seq, 14 + n);
}

static void set_input(uint8_t seq, const uint8_t *p, size_t len) {
  if (len < 4) { send_error(seq, EP_ERR_BAD_ARGS, "SET_INPUT needs an offset", 0); return; }
  uint32_t offset = get32(p), n = (uint32_t)(len - 4);
  if (offset > INPUT_BYTES || n > INPUT_BYTES - offset) {
    send_error(seq, EP_ERR_BAD_ARGS, "SET_INPUT past the end of the input", 0);
    return;
  }
  memcpy((uint8_t *)input + offset, p + 4, n);
  if (offset <= input_set && offset + n > input_set) input_set = offset + n;
  put32(TX_PAYLOAD, offset + n);
  send(EP_MSG_ACK, seq, 4);
}

/* Decimal of a small non-negative number, for error messages without printf (not on every board). */
static const char *decimal(uint32_t v) {
  static char buf[12];
  char *c = buf + sizeof buf - 1;
  *c = '\0';
  do { *--c = (char)('0' + v % 10); v /= 10; } while (v);
  return c;
}

static void run(uint8_t seq, const uint8_t *p, size_t len) {
  if (len != 4) { send_error(seq, EP_ERR_BAD_ARGS, "RUN takes runs and warmup", 0); return; }
  uint32_t runs = get16(p), warmup = get16(p + 2);
  if (runs == 0 || runs > MAX_RUNS) { send_error(seq, EP_ERR_BAD_ARGS, "RUN: runs must be 1..", decimal(MAX_RUNS)); return; }
  /* PROGRESS counts runs in 16 bits: past that it would wrap, and the host takes only rising counts. */
  if (runs + warmup > EP_MAX_RUN_TOTAL) {
    send_error(seq, EP_ERR_BAD_ARGS, "RUN: runs + warmup must be at most ", decimal(EP_MAX_RUN_TOTAL));
    return;
  }
  if (input_set < INPUT_BYTES) { send_error(seq, EP_ERR_NO_INPUT, "RUN before the whole input was set", 0); return; }
  float since_beat = 0;
  for (uint32_t i = 0; i < warmup + runs && !link_lost; ++i) {
    ep_port_timer_start();
    int rc = EP_PKG_RUN(input, output);
    float us = ep_port_timer_us();
    if (rc != 0) {
      static char what[24] = "kernel ";
      strcpy(what + 7, decimal((uint32_t)rc));
      strcat(what, ": ");
      send_error(seq, EP_ERR_MODEL_FAILED, what, EP_PKG_LAST_ERROR());
      return;
    }
    if (i >= warmup) times_us[i - warmup] = us;
    /* A heartbeat, so the host's deadline is per run rather than per batch; rare, so that a UART sending in the
     * background (DMA, interrupts) does not slow the runs being timed. */
    since_beat += us;
    if (since_beat >= EP_HEARTBEAT_US && i + 1 < warmup + runs) {
      since_beat = 0;
      put16(TX_PAYLOAD, i + 1);
      send(EP_MSG_PROGRESS, seq, 2);
    }
  }
  put16(TX_PAYLOAD, runs);
  for (uint32_t i = 0; i < runs; ++i) {
    uint32_t bits;
    memcpy(&bits, &times_us[i], 4);
    put32(TX_PAYLOAD + 2 + 4 * i, bits);
  }
  send(EP_MSG_TIMES, seq, 2 + 4 * runs);
}

static void get_output(uint8_t seq, const uint8_t *p, size_t len) {
  if (len != 6) { send_error(seq, EP_ERR_BAD_ARGS, "GET_OUTPUT takes offset and length", 0); return; }
  uint32_t offset = get32(p), n = get16(p + 4);
  if (n > EP_MAX_PAYLOAD - 4 || offset > OUTPUT_BYTES || n > OUTPUT_BYTES - offset) {
    send_error(seq, EP_ERR_BAD_ARGS, "GET_OUTPUT out of range", 0);
    return;
  }
  put32(TX_PAYLOAD, offset);
  memcpy(TX_PAYLOAD + 4, (const uint8_t *)output + offset, n);
  send(EP_MSG_OUTPUT, seq, 4 + n);
}

static void dispatch(uint8_t type, uint8_t seq, const uint8_t *p, size_t len) {
  switch (type) {
    case EP_MSG_HELLO: hello(seq); break;
    case EP_MSG_SET_INPUT: set_input(seq, p, len); break;
    case EP_MSG_RUN: run(seq, p, len); break;
    case EP_MSG_GET_OUTPUT: get_output(seq, p, len); break;
    default: send_error(seq, EP_ERR_UNKNOWN_TYPE, "unknown request type ", decimal(type));
  }
}

/* One byte into the frame being received: hunt for the magic, read the header, then payload and CRC. Returns the
 * length of a frame it rejected (its bytes stay at the start of rx for rescan), else 0. */
static size_t feed(uint8_t b) {
  if (rx_len == 0 && b != EP_MAGIC0) return 0;
  if (rx_len == 1 && b != EP_MAGIC1) {
    rx_len = b == EP_MAGIC0; /* this byte may start the real frame */
    return 0;
  }
  rx[rx_len++] = b;
  if (rx_len < EP_HEADER_BYTES) return 0;
  size_t len = get16(rx + 4), taken = rx_len;
  if (len > EP_MAX_PAYLOAD) {
    rx_len = 0; /* its payload never fits, so do not wait for it */
    send_error(rx[3], EP_ERR_TOO_LONG, "frame longer than ", decimal(EP_MAX_PAYLOAD));
    return taken;
  }
  if (rx_len < EP_HEADER_BYTES + len + EP_CRC_BYTES) return 0;
  rx_len = 0;
  if (crc32(rx + 2, 4 + len) != get32(rx + EP_HEADER_BYTES + len)) {
    send_error(rx[3], EP_ERR_BAD_CRC, "bad CRC", 0);
    return taken;
  }
  dispatch(rx[2], rx[3], rx + EP_HEADER_BYTES, len);
  return 0;
}

/* Hunt again through the first n bytes of rx, from the one after the magic, as the host's Decoder does: a damaged
 * length may have swallowed the start of a good frame. In place: the frame being rebuilt at the start of rx never
 * reaches the byte being replayed. A frame rejected during the replay is itself replayed, then the rest; each
 * rejection shortens what is left by at least its magic byte, so this ends. */
static void rescan(size_t n) {
  size_t next = 1;
  while (next < n && !link_lost) {
    size_t rejected = feed(rx[next++]);
    if (rejected) {
      memmove(rx + rejected, rx + next, n - next);
      n = rejected + (n - next);
      next = 1;
    }
  }
}

static void take(uint8_t b) {
  size_t rejected = feed(b);
  if (rejected) rescan(rejected);
}

void ep_agent_serve(void) {
  uint8_t buf[64];
  link_lost = 0;
  while (!link_lost) {
    int n = ep_port_read(buf, sizeof buf);
    if (n < 0) return;
    if (n == 0 && rx_len > 0) { /* idle line: the half received frame will never be completed, but it may */
      size_t half = rx_len;    /* have swallowed a whole good one after a damaged length */
      rx_len = 0;
      rescan(half);
    }
    for (int i = 0; i < n && !link_lost; ++i) take(buf[i]);
  }
}
