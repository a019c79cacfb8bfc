"""Runs the reference application in several processes that share one port,
each with its own memory, as a multi-worker deployment does. Each process
binds the port with SO_REUSEPORT, so the kernel hands every new connection to
one of them at random.

    python serve.py --port 8080 --processes 3

sessiond must never end the sessions of such a deployment: it sees boot ids
that disagree, treats the controller as unreachable, and says why.
"""

import argparse
import os
import signal
import socket
import sys

import uvicorn


def serve(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(128)
    config = uvicorn.Config("app:app", log_level="warning", timeout_keep_alive=1)
    uvicorn.Server(config).run(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    children = []
    for _ in range(args.processes):
        pid = os.fork()
        if pid == 0:
            serve(args.host, args.port)
            os._exit(0)
        children.append(pid)

    def stop(signum, frame):
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        os.waitpid(child, 0)


if __name__ == "__main__":
    main()
