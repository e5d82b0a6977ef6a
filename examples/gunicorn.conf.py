"""A gunicorn config with numareuse (run as root: loading the program needs CAP_BPF, CAP_NET_ADMIN).

    gunicorn -c examples/gunicorn.conf.py --pythonpath examples gunicorn_app:app
    curl -si http://127.0.0.1:8080/ | grep X-Worker      # pid and CPUs of the worker that answered

Everything above the last line is plain gunicorn; the hooks defined here keep
working, numareuse chains its own with them.
"""

import multiprocessing

bind = "127.0.0.1:8080"
reuse_port = True  # one listening socket per worker: what numareuse steers between
workers = multiprocessing.cpu_count()
max_requests = 5000  # recycling resets no connection: the arbiter keeps each worker's socket
max_requests_jitter = 500
numareuse_domains = "numa"  # or "llc", "cpu", "0-15;16-31"; NUMAREUSE_DOMAINS overrides it


def post_fork(server, worker):
    server.log.info("worker %s booted", worker.pid)  # runs after numareuse pinned the worker


from numareuse.integrations.gunicorn import enable  # noqa: E402

enable(globals())
