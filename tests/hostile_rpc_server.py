"""A TVM rpc_server on 127.0.0.1 that lies about time, for test_devices.py:

    python hostile_rpc_server.py TRACKER_PORT KEY LIE

LIE is what its time evaluator does: "nan" or "negative" (every run reports that many seconds), or "hang" (it never
returns, and the server ignores the client's session timeout: a session that never ends). It registers with the
tracker under KEY and serves like a real rpc_server otherwise (upload, load_module, tensors).
"""

from __future__ import annotations

import os
import struct
import sys
import time

TIMES = {"nan": float("nan"), "negative": -5e-6}


def lie() -> None:
    """Runs in the server's process before it listens; its session workers are forked from it, so they lie too."""
    import tvm.rpc.server
    import tvm_ffi

    how = os.environ["HOSTILE_LIE"]

    def time_evaluator(module, name, device_type, device_id, number, repeat, *rest):
        def evaluate(*args):
            if how == "hang":
                time.sleep(3600)
            return bytearray(struct.pack("@" + "d" * repeat, *[TIMES[how]] * repeat))

        return tvm_ffi.convert(evaluate)

    tvm_ffi.register_global_func("runtime.RPCTimeEvaluator", time_evaluator, override=True)
    if how == "hang":
        tvm.rpc.server._parse_server_opt = lambda opts: {}  # no session timeout: it serves the session forever


def main() -> None:
    import tvm.rpc

    tracker_port, key, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["HOSTILE_LIE"] = how  # read by lie() in the server's own process, which inherits the environment
    server = tvm.rpc.Server("127.0.0.1", port=9300, port_end=9400, tracker_addr=("127.0.0.1", tracker_port),
                            key=key, server_init_callback=lie)
    server.proc.join()


if __name__ == "__main__":
    main()
