"""Example servers built on the library, shipped so that ``make demo`` and the tests run them.

Not part of the library's API: ``prefork`` is an nginx-like pre-fork HTTP
server (master, pinned workers, control socket, graceful stop) that shows
how a server calls :meth:`numareuse.Selector.register` from its workers.
"""
