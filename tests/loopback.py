"""What the tests' own HTTP servers share: a context manager around start()/stop(), and
the address of a server listening on 127.0.0.1."""


class Loopback:
    _server = None  # the http.server instance once started

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, f"{type(self).__name__} not started"
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"
