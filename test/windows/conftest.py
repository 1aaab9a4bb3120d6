import gevent.socket  # noqa: F401  (the tests use gevent.socket through `gevent`)
