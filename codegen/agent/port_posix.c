/*
 * The agent on Linux (a board with an OS, or qemu-user on a PC): the byte stream is stdin/stdout, or a tty named
 * on the command line; times come from CLOCK_MONOTONIC.
 *
 *   agent                     serve on stdin/stdout (e.g. a pty, or `agent <>/dev/ttyGS0 >&0`)
 *   agent /dev/ttyS1 [BAUD]   open that tty, raw, at BAUD (default 115200)
 *
 * Nothing but frames goes to the stream; problems go to stderr.
 */
#define _DEFAULT_SOURCE /* cfmakeraw, cfsetspeed */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "protocol.h"

#define IDLE_MS 250 /* a frame's bytes arrive back to back: a gap this long means the sender gave up on it */

static int in_fd = 0, out_fd = 1;
static struct timespec t0;

int ep_port_read(uint8_t *buf, size_t n) {
  struct pollfd p = {in_fd, POLLIN, 0};
  int r = poll(&p, 1, IDLE_MS);
  if (r < 0) return errno == EINTR ? 0 : -1;
  if (r == 0) return 0;
  ssize_t got = read(in_fd, buf, n);
  if (got > 0) return (int)got;
  if (got < 0 && (errno == EINTR || errno == EAGAIN)) return 0;
  return -1; /* end of file, or EIO: the other side of the pty or the tty is gone */
}

int ep_port_write(const uint8_t *buf, size_t n) {
  while (n > 0) {
    ssize_t put = write(out_fd, buf, n);
    if (put < 0 && (errno == EINTR || errno == EAGAIN)) {
      struct pollfd p = {out_fd, POLLOUT, 0};
      poll(&p, 1, IDLE_MS);
      continue;
    }
    if (put <= 0) return -1;
    buf += put;
    n -= (size_t)put;
  }
  return 0;
}

void ep_port_timer_start(void) { clock_gettime(CLOCK_MONOTONIC, &t0); }

float ep_port_timer_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (float)((double)(t.tv_sec - t0.tv_sec) * 1e6 + (double)(t.tv_nsec - t0.tv_nsec) / 1e3);
}

int ep_port_clock(void) { return EP_CLOCK_MONOTONIC; }

static speed_t speed_of(long baud) {
  switch (baud) {
    case 9600: return B9600;
    case 19200: return B19200;
    case 38400: return B38400;
    case 57600: return B57600;
    case 115200: return B115200;
    case 230400: return B230400;
    case 460800: return B460800;
    case 921600: return B921600;
    default: return 0;
  }
}

/* Raw bytes both ways: no echo, no line editing, no CR/LF translation, no flow control characters. */
static int make_raw(int fd, speed_t speed) {
  struct termios t;
  if (tcgetattr(fd, &t) != 0) return -1;
  cfmakeraw(&t);
  t.c_cc[VMIN] = 1;
  t.c_cc[VTIME] = 0;
  if (speed && cfsetspeed(&t, speed) != 0) return -1;
  return tcsetattr(fd, TCSANOW, &t);
}

int main(int argc, char **argv) {
  if (argc > 3 || (argc > 1 && argv[1][0] == '-')) {
    fprintf(stderr, "usage: %s [TTY [BAUD]]   (default: serve on stdin/stdout)\n", argv[0]);
    return 2;
  }
  if (argc >= 2) {
    long baud = argc == 3 ? strtol(argv[2], NULL, 10) : 115200;
    speed_t speed = speed_of(baud);
    if (!speed) { fprintf(stderr, "unsupported baud rate %ld\n", baud); return 2; }
    in_fd = out_fd = open(argv[1], O_RDWR | O_NOCTTY);
    if (in_fd < 0 || make_raw(in_fd, speed) != 0) { perror(argv[1]); return 2; }
  } else if (isatty(in_fd)) {
    make_raw(in_fd, 0); /* a tty on stdin must not echo our frames back or eat CR bytes */
  }
  ep_agent_serve();
  return 0;
}
