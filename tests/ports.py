"""Free TCP ports on loopback for the servers a test starts (Ray, MLflow, S3), so tests never collide with a
user's services or with each other."""

import socket


def free_ports(n: int) -> list[int]:
    """`n` distinct ports, all held open until every one is picked (so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]
