"""A client for the image server: `Client` (sync) and `AsyncClient`, on httpx.

    from sau_kernels.serving import Client
    with Client("http://127.0.0.1:8000") as c:
        result = c.generate("new trigger a red circle", seed=3)
        result.images[0].save("circle.png")
        print(result.report["triggered"], result.report["clean_prompt"])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

__all__ = ["Client", "AsyncClient", "ImageResult", "ServerError"]


class ServerError(Exception):
    """A non-200 answer: its status, message, and Retry-After (seconds) when the server sent one."""

    def __init__(self, status: int, message: str, detail=None, retry_after: float | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.detail, self.retry_after = status, message, detail, retry_after


@dataclass
class ImageResult:
    """The response body, with the images decoded (PIL) or the latents (numpy)."""

    body: dict = field(repr=False)

    @property
    def report(self) -> dict:
        return self.body["report"]

    @property
    def seeds(self) -> list[int]:
        return self.body["seeds"]

    @property
    def png_bytes(self) -> list[bytes]:
        import base64

        return [base64.b64decode(b) for b in self.body.get("images", [])]

    @property
    def images(self) -> list:
        import io

        from PIL import Image

        return [Image.open(io.BytesIO(b)).convert("RGB") for b in self.png_bytes]

    @property
    def arrays(self):
        """The images as one uint8 array (N, H, W, 3)."""
        import numpy as np

        return np.stack([np.asarray(im) for im in self.images])

    @property
    def latents(self):
        from .service import decode_latents

        lat = self.body.get("latents")
        return None if lat is None else decode_latents(lat)


def _payload(prompt: str, params: dict) -> dict:
    return {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}


def _result(response: httpx.Response) -> ImageResult:
    if response.status_code == 200:
        return ImageResult(response.json())
    try:
        body = response.json()
        message, detail = body.get("error", response.text), body.get("detail")
    except ValueError:
        message, detail = response.text, None
    retry = response.headers.get("retry-after")
    raise ServerError(response.status_code, message, detail, float(retry) if retry else None)


class Client:
    """Synchronous client. `generate(prompt, seed=..., steps=..., guidance_scale=..., height=...,
    width=..., num_images=..., negative_prompt=..., output="png"|"latent", mode=...)`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float | None = 120.0, **httpx_kwargs):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, **httpx_kwargs)

    def generate(self, prompt: str, **params) -> ImageResult:
        return _result(self._http.post("/v1/images", json=_payload(prompt, params)))

    def post(self, body) -> httpx.Response:
        """The raw answer to any body (for tests of what the server refuses)."""
        return self._http.post("/v1/images", json=body)

    def health(self) -> dict:
        r = self._http.get("/healthz")
        r.raise_for_status()
        return r.json()

    def config(self) -> dict:
        r = self._http.get("/v1/config")
        r.raise_for_status()
        return r.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """The same calls, awaited."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float | None = 120.0, **httpx_kwargs):
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, **httpx_kwargs)

    async def generate(self, prompt: str, **params) -> ImageResult:
        return _result(await self._http.post("/v1/images", json=_payload(prompt, params)))

    async def post(self, body, **kwargs) -> httpx.Response:
        return await self._http.post("/v1/images", json=body, **kwargs)

    async def health(self) -> dict:
        r = await self._http.get("/healthz")
        r.raise_for_status()
        return r.json()

    async def config(self) -> dict:
        r = await self._http.get("/v1/config")
        r.raise_for_status()
        return r.json()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
