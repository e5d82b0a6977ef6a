"""A tiny app that says which worker answered: its pid and the CPUs it may run on.

    gunicorn -c python:numareuse.gunicorn --reuse-port -w 2 --pythonpath examples gunicorn_app:app
    gunicorn -c python:numareuse.gunicorn --reuse-port -w 2 -k uvicorn_worker.UvicornWorker \
        --pythonpath examples gunicorn_app:asgi

Every response carries ``X-Worker-Pid`` and ``X-Worker-Cpus`` (a CPU list such
as ``0`` or ``0-1``), and the same as its body, so a client pinned to a CPU can
check that a worker of that CPU's domain served it.
"""

import os


def _cpulist() -> str:
    ranges: list[list[int]] = []
    for cpu in sorted(os.sched_getaffinity(0)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _answer() -> tuple[bytes, list[tuple[str, str]]]:
    pid, cpus = str(os.getpid()), _cpulist()
    body = f"pid={pid} cpus={cpus}\n".encode()
    return body, [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
        ("X-Worker-Pid", pid),
        ("X-Worker-Cpus", cpus),
    ]


def app(environ, start_response):
    """WSGI (sync, gthread)."""
    body, headers = _answer()
    start_response("200 OK", headers)
    return [body]


async def asgi(scope, receive, send):
    """ASGI (uvicorn_worker.UvicornWorker)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body, headers = _answer()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
