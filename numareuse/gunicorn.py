"""A ready gunicorn config: ``gunicorn -c python:numareuse.gunicorn [-w N] app:app``.

It turns on ``reuse_port`` (the steering needs one listening socket per
worker) and numareuse's hooks (:mod:`numareuse.integrations.gunicorn`);
``NUMAREUSE_DOMAINS`` chooses the domains (default ``numa``). With a config
file of your own, make ``enable(globals())`` its last line instead.
"""

from numareuse.integrations.gunicorn import enable

reuse_port = True
enable(globals())
