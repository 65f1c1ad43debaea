"""Repository: objects + refs + config + local cache, at one storage URL (FORMAT.md §1, §10)."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import platformdirs

from keepsake.errors import (
    AmbiguousObjectId,
    CorruptObject,
    InvalidObjectId,
    InvalidRefName,
    KeyNotFound,
    ObjectNotFound,
    RefNotFound,
    RepositoryExists,
    RepositoryNotFound,
    UnsupportedFormat,
    WrongObjectType,
)
from keepsake.objects.cache import FileCache
from keepsake.objects.chunking import Chunker, ChunkerParams
from keepsake.objects.database import ObjectDB
from keepsake.objects.ids import ObjectId, ObjectType, is_id_prefix
from keepsake.refs.names import check_ref_name
from keepsake.refs.store import RefStore
from keepsake.storage import Storage

#: The repository format this Keepsake writes and the newest it can read.
FORMAT_VERSION = 1
CONFIG_KEY = "config"

#: Where a short name is looked for, in order (as git does with refs/heads, refs/tags).
REF_SEARCH = ("{}", "tags/{}", "experiments/{}", "checkpoints/{}")


@dataclass(frozen=True)
class Config:
    """The repository's ``config`` file: what readers must agree on to use it."""

    format: int = FORMAT_VERSION
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    chunker: ChunkerParams = ChunkerParams()

    def encode(self) -> bytes:
        doc = {"format": self.format, "id": self.id, "created": self.created, "chunker": self.chunker.to_dict()}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, url: str) -> Config:
        try:
            doc = json.loads(data)
            fmt = doc["format"]
            if not isinstance(fmt, int):
                raise TypeError("format is not an integer")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptObject(f"{url}/config", f"config is not valid: {exc}") from exc
        if fmt > FORMAT_VERSION:
            raise UnsupportedFormat(url, fmt, FORMAT_VERSION)
        try:
            chunker = ChunkerParams(**doc["chunker"])
            # FIX: sizes FastCDC rejects raised a bare ValueError (a traceback in the CLI)
            # from Repository.__init__; check them here so a bad config is CorruptObject.
            Chunker(chunker)
            return cls(fmt, str(doc["id"]), str(doc.get("created", "")), chunker)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptObject(f"{url}/config", f"config is not valid: {exc}") from exc


def cache_root() -> str:
    return os.environ.get("KEEPSAKE_CACHE_DIR") or platformdirs.user_cache_dir("keepsake")


class Repository:
    """An opened repository. Use :meth:`init` or :meth:`open`."""

    def __init__(self, storage: Storage, config: Config) -> None:
        self.storage = storage
        self.config = config
        self.url = storage.url
        cache = None
        if storage.backend not in ("local", "memory"):
            cache = FileCache(os.path.join(cache_root(), config.id))
        #: the local cache of immutable things (None on local disk and memory://)
        self.cache = cache
        self.objects = ObjectDB(storage, cache)
        self.refs = RefStore(storage)
        self.chunker = Chunker(config.chunker)

    @classmethod
    def init(cls, url: str, options: dict[str, Any] | None = None) -> Repository:
        """Create a repository at ``url``. Raises RepositoryExists."""
        storage = Storage.open(url, options)
        config = Config()
        if not storage.create(CONFIG_KEY, config.encode(), unique=True):
            raise RepositoryExists(storage.url)
        return cls(storage, config)

    @classmethod
    def open(cls, url: str, options: dict[str, Any] | None = None) -> Repository:
        """Open the repository at ``url``.

        Raises:
            RepositoryNotFound: nothing, or something that is not a repository, is there.
            UnsupportedFormat: it was written by a newer Keepsake.
        """
        storage = Storage.open(url, options)
        try:
            data = storage.read(CONFIG_KEY)
        except KeyNotFound:
            raise RepositoryNotFound(storage.url) from None
        return cls(storage, Config.decode(data, storage.url))

    def close(self) -> None:
        self.objects.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self, text: str, expected: ObjectType | None = None) -> ObjectId:
        """Turn a ref name, full id or unique id prefix (7+ hex characters) into a full id.

        Raises:
            ObjectNotFound: no ref or object matches.
            AmbiguousObjectId: the prefix matches several objects.
            InvalidObjectId: ``text`` is neither a ref name nor an id prefix.
            WrongObjectType: it resolves to an object that is not of type ``expected``.
        """
        object_id = self._resolve(text)
        if expected is not None:
            actual = self.objects.locate(object_id).type
            if actual != expected:
                raise WrongObjectType(object_id, expected.label, actual.label)
        return object_id

    def _resolve(self, text: str) -> ObjectId:
        looks_like_ref = True
        try:
            check_ref_name(text)
        except InvalidRefName:  # not a ref name: only an id prefix can match
            looks_like_ref = False
        if looks_like_ref:
            for pattern in REF_SEARCH:
                try:
                    return self.refs.get(pattern.format(text))
                except RefNotFound:
                    continue
        if not is_id_prefix(text):
            if looks_like_ref:
                raise ObjectNotFound(text, what="ref or object")
            raise InvalidObjectId(text)
        matches = self.objects.find_prefix(text)
        if not matches:
            self.objects.refresh()
            matches = self.objects.find_prefix(text)
        if not matches:
            raise ObjectNotFound(text)
        if len(matches) > 1:
            raise AmbiguousObjectId(text, matches)
        return matches[0]
