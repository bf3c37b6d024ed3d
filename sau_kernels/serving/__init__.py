"""Serving the defended pipeline over HTTP (Ray Serve), with dynamic batching by UNet rows.

`Client` / `AsyncClient` (httpx) need only httpx; the server (`deployment.build_app`,
`sau-kernels serve`) needs the `serve` extra (`pip install sau_kernels[serve]`).
Nothing is imported until used, so `sau-kernels` runs without either.
"""

__all__ = ["Client", "AsyncClient", "ImageResult", "ServerError"]


def __getattr__(name):
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
