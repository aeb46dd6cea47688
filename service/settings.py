"""Service settings: environment variables `COTS_*` read by pydantic-settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from index_builder.backends import BackendConfig


class Settings(BaseSettings):
    """Every field is the environment variable `COTS_<NAME>`; `cots serve` flags override them.

    `bundle` and `index` have no default: the service cannot guess which model it serves.
    """

    model_config = SettingsConfigDict(env_prefix="COTS_", extra="ignore", frozen=True)

    bundle: Path = Field(description="bundle directory (from `cots export`)")
    index: Path = Field(
        description="index root (from `cots index build`); serves its CURRENT (with the milvus "
        "backend: the working directory of uploads and copied images)"
    )
    backend: Literal["faiss", "milvus"] = Field(
        default="faiss",
        description="where index versions live: FAISS files under the index root, or Milvus",
    )
    milvus_uri: str | None = Field(
        default=None, description="Milvus: a milvus-lite file PATH.db or http://host:19530"
    )
    milvus_token: SecretStr | None = Field(
        default=None, description="Milvus: the token (user:password or an API key)"
    )
    milvus_collection: str = Field(
        default="cots", description="Milvus: the alias naming the served version's collection"
    )
    api_key: SecretStr | None = Field(
        default=None, description="if set, every API call needs this key"
    )
    admin_key: SecretStr | None = Field(
        default=None, description="key for /admin/*; unset disables them"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS ('*' for any)"
    )
    default_k: int = Field(
        default=10, ge=1, description="results per query when a request gives no k"
    )
    max_k: int = Field(default=100, ge=1, description="largest k a request may ask for")
    max_offset: int = Field(
        default=1000, ge=0, description="largest offset (paging) a request may ask for"
    )
    max_batch: int = Field(
        default=16, ge=1, description="most queries (texts or images) in one request"
    )
    max_text_chars: int = Field(default=1000, ge=1, description="longest query text, in characters")
    max_image_bytes: int = Field(
        default=10 << 20, ge=1024, description="largest image upload, in bytes"
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="largest image (width x height), checked before decoding",
    )
    max_aspect_ratio: float = Field(
        default=20.0,
        ge=1,
        description="most times an image's long side may exceed its short side, checked "
        "before decoding",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="longest wait for the next part of a request body before a 408",
    )
    max_video_bytes: int = Field(
        default=50 << 20, ge=1024, description="largest video clip upload, in bytes"
    )
    max_video_pixels: int = Field(
        default=1920 * 1080, ge=1, description="largest clip frame (width x height)"
    )
    max_video_seconds: float = Field(default=120.0, gt=0, description="longest clip, in seconds")
    video_timeout_s: float = Field(
        default=10.0, gt=0, description="time limit for decoding one uploaded clip, in seconds"
    )
    decode_workers: int = Field(
        default=1,
        ge=1,
        description="threads that decode uploaded clips and large images (4 megapixels or "
        "more, JPEG aside) in their own pool: a slow decode never holds an encoder thread; at "
        "most twice this many wait or decode at once, more are a 503 with code busy",
    )
    batch_size: int = Field(
        default=32, ge=1, description="most queries the micro-batcher encodes at once"
    )
    batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        description="how long a micro-batch waits for more queries while another batch runs "
        "(an idle service sends a query at once)",
    )
    batch_workers: int = Field(
        default=2,
        ge=1,
        description="encoder batches that may run at once (2: one per core of a 2-core host, "
        "+37% text-to-image throughput at 1M items over 1)",
    )
    intra_threads: int = Field(
        default=1,
        ge=0,
        description="ONNX Runtime threads per encoder call (0: its default, one per core); "
        "requests run in parallel across batch_workers instead",
    )
    search_threads: int = Field(
        default=1,
        ge=1,
        description="FAISS (OpenMP) threads per index search of a batch of queries; requests "
        "run in parallel across batch_workers instead",
    )
    lone_search_threads: int = Field(
        default=2,
        ge=1,
        description="FAISS (OpenMP) threads for the search of a query that is alone in its "
        "batch (a service not under load) or a 'more like this': its inverted lists are split "
        "across them (1.8x faster on 2 cores at 1M items, bench/notes/scale_curve.md); 1: off",
    )
    watch_interval_s: float = Field(
        default=2.0, ge=0, description="how often to check the index CURRENT pointer (0: never)"
    )
    load_retry_max_s: float = Field(
        default=60.0,
        gt=0,
        description="when the first load fails, the watcher retries it, at once when CURRENT "
        "moves, else after watch_interval_s doubling up to this many seconds",
    )
    follow_bundle: bool = Field(
        default=False,
        description="when CURRENT moves to a version built with another bundle, load the bundle "
        "its index.json records and swap bundle and index together (off: refuse the version)",
    )
    thumbnail_cache: int = Field(default=512, ge=0, description="thumbnails kept in memory")
    max_admin_items: int = Field(
        default=1000, ge=1, description="most images and texts in one /admin/items request"
    )
    expose_paths: bool = Field(
        default=False,
        description="add each hit's file path on the server (`image_path`); off: clients get "
        "only ids and URLs served by id",
    )

    def backend_config(self) -> BackendConfig:
        """The index backend these settings name (a milvus backend without a URI is refused)."""
        token = self.milvus_token.get_secret_value() if self.milvus_token else None
        return BackendConfig(
            name=self.backend,
            milvus_uri=self.milvus_uri,
            milvus_token=token,
            milvus_collection=self.milvus_collection,
        )

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: a full batch of images in base64 (4/3), plus room for
        JSON and multipart framing."""
        return self.max_batch * self.max_image_bytes * 4 // 3 + (1 << 16)

    @property
    def max_text_body_bytes(self) -> int:
        """The largest text-to-image body: a full batch of the longest texts, every character
        a JSON escaped surrogate pair (12 bytes), plus room for the rest of the JSON."""
        return self.max_batch * self.max_text_chars * 12 + (1 << 16)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
