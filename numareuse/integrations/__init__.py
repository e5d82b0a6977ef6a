"""numareuse for servers it did not write, as a configuration they load.

* :mod:`numareuse.integrations.gunicorn`: gunicorn with ``--reuse-port``
  (``enable(globals())`` as the last line of a ``gunicorn.conf.py``, or the
  ready config ``gunicorn -c python:numareuse.gunicorn``).

Nothing here is imported by ``import numareuse``: each integration imports
its server only when it is used.
"""
