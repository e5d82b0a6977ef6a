"""The nginx.conf that the tests and benchmarks run Debian's nginx with (one template).

Every worker answers with its pid (body and ``X-Worker-Pid``), so a client can tell
which worker accepted its connection; every temp path and the pid file stay in ``dir``
(nginx runs unprivileged paths only, no /var/lib/nginx).
"""

from __future__ import annotations

import os

_CONF = """\
worker_processes {workers};
worker_cpu_affinity {affinity};
{extra}daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            add_header X-Worker-Pid $pid;
            return 200 "$pid\\n";
        }}
    }}
}}
"""


def conf(
    dir: str | os.PathLike,
    port: int,
    workers: int = 2,
    affinity: str = "auto",
    connections: int = 1024,
    shutdown_timeout: str | None = None,
) -> str:
    """nginx.conf text: ``workers`` workers pinned by ``worker_cpu_affinity affinity``
    ("auto" or masks like "01 10"), listening with reuseport on 127.0.0.1:``port``."""
    extra = f"worker_shutdown_timeout {shutdown_timeout};\n" if shutdown_timeout else ""
    return _CONF.format(dir=dir, port=port, workers=workers, affinity=affinity, connections=connections, extra=extra)
