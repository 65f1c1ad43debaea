"""File manifests (blobs) and directory manifests (trees) (FORMAT.md §5).

Objects are values: frozen dataclasses with ``encode() -> bytes`` and ``decode(bytes)``.
Encodings are canonical msgpack (fixed field order), so equal values have equal ids.
Decoding validates everything a hostile repository could get wrong: types, sizes, and entry
names (no ``/``, NUL, ``.`` or ``..``, no empty names, sorted and unique).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Any, ClassVar

from keepsake.errors import CorruptObject
from keepsake.objects.wire import pack_msgpack, unpack_msgpack
from keepsake.objects.ids import ID_BYTES, ObjectId, ObjectType, hash_object, id_from_bytes, id_to_bytes

#: Files smaller than this are stored inside their blob instead of as a chunk.
INLINE_LIMIT = 4096

MODE_FILE = 0o100644
MODE_EXECUTABLE = 0o100755
MODE_SYMLINK = 0o120000
MODE_TREE = 0o040000
MODES = frozenset({MODE_FILE, MODE_EXECUTABLE, MODE_SYMLINK, MODE_TREE})

def _require(cond: bool, object_id: str, reason: str) -> None:
    if not cond:
        raise CorruptObject(object_id, reason)


def check_entry_name(name: object) -> str | None:
    """Return why ``name`` is not a safe single path component, or None when it is."""
    if not isinstance(name, str):
        return "is not a string"
    if name in ("", ".", ".."):
        return "is empty, '.' or '..'"
    if "/" in name or "\0" in name or "\\" in name:
        return "contains '/', '\\' or NUL"
    return None


@dataclass(frozen=True)
class Blob:
    """A file's content: its size and the ordered chunks, or the bytes inline when small."""

    TYPE: ClassVar[ObjectType] = ObjectType.BLOB

    size: int
    chunks: tuple[tuple[ObjectId, int], ...] = ()
    inline: bytes | None = None

    def encode(self) -> bytes:
        if self.inline is not None:
            return pack_msgpack({"size": self.size, "data": self.inline})
        ids = b"".join(id_to_bytes(cid) for cid, _ in self.chunks)
        return pack_msgpack({"size": self.size, "ids": ids, "lengths": [n for _, n in self.chunks]})

    @property
    def id(self) -> ObjectId:
        return hash_object(self.TYPE, self.encode())

    @classmethod
    def decode(cls, data: bytes, object_id: str = "?") -> Blob:
        doc = unpack_msgpack(data, object_id)
        _require(isinstance(doc, dict) and isinstance(doc.get("size"), int), object_id, "blob has no size")
        size = doc["size"]
        _require(size >= 0, object_id, "blob size is negative")
        if "data" in doc:
            inline = doc["data"]
            _require(isinstance(inline, bytes) and len(inline) == size, object_id, "inline data does not match size")
            return cls(size, (), inline)
        ids, lengths = doc.get("ids"), doc.get("lengths")
        _require(isinstance(ids, bytes) and isinstance(lengths, list), object_id, "blob has no chunk list")
        _require(len(ids) == ID_BYTES * len(lengths), object_id, "blob chunk ids and lengths differ in count")
        _require(all(isinstance(n, int) and n > 0 for n in lengths), object_id, "blob has a bad chunk length")
        _require(sum(lengths) == size, object_id, "blob chunk lengths do not add up to its size")
        chunks = tuple(
            (id_from_bytes(ids[i * ID_BYTES : (i + 1) * ID_BYTES]), n) for i, n in enumerate(lengths)
        )
        return cls(size, chunks, None)


@dataclass(frozen=True)
class TreeEntry:
    """One directory entry. ``target`` is set for symlinks, ``id`` for files and trees."""

    name: str
    mode: int
    size: int
    id: ObjectId | None = None
    target: str | None = None

    @property
    def is_tree(self) -> bool:
        return self.mode == MODE_TREE

    @property
    def is_symlink(self) -> bool:
        return self.mode == MODE_SYMLINK

    @property
    def is_file(self) -> bool:
        return self.mode in (MODE_FILE, MODE_EXECUTABLE)

    @property
    def kind(self) -> str:
        return "tree" if self.is_tree else "link" if self.is_symlink else "blob"

    def to_wire(self) -> list[Any]:
        ref: Any = self.target if self.is_symlink else id_to_bytes(self.id) if self.id else None
        return [self.name, self.mode, self.size, ref]


@dataclass(frozen=True)
class Tree:
    """A directory: entries sorted by the UTF-8 bytes of their names."""

    TYPE: ClassVar[ObjectType] = ObjectType.TREE

    entries: tuple[TreeEntry, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(sorted(self.entries, key=lambda e: e.name.encode())))

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def encode(self) -> bytes:
        return pack_msgpack({"entries": [e.to_wire() for e in self.entries]})

    @property
    def id(self) -> ObjectId:
        return hash_object(self.TYPE, self.encode())

    def get(self, name: str) -> TreeEntry | None:
        for e in self.entries:
            if e.name == name:
                return e
        return None

    @classmethod
    def decode(cls, data: bytes, object_id: str = "?") -> Tree:
        doc = unpack_msgpack(data, object_id)
        _require(isinstance(doc, dict) and isinstance(doc.get("entries"), list), object_id, "tree has no entries")
        entries = []
        previous: bytes | None = None
        for wire in doc["entries"]:
            _require(isinstance(wire, list) and len(wire) == 4, object_id, "tree entry is malformed")
            name, mode, size, ref = wire
            problem = check_entry_name(name)
            _require(problem is None, object_id, f"tree entry name {name!r} {problem}")
            # FIX (tests/objects/test_manifests.py): `mode in MODES` raised TypeError for an
            # unhashable mode (a msgpack array or map); check the type first.
            _require(
                isinstance(mode, int) and mode in MODES, object_id, f"tree entry {name!r} has unknown mode {mode!r}"
            )
            _require(isinstance(size, int) and size >= 0, object_id, f"tree entry {name!r} has a bad size")
            key = name.encode()
            _require(previous is None or key > previous, object_id, "tree entries are not sorted and unique")
            previous = key
            if mode == MODE_SYMLINK:
                # FIX (tests/objects/test_manifests.py): an empty target used to be accepted,
                # and checkout then crashed in os.symlink with FileNotFoundError instead of
                # reporting the corrupt tree. No file system can hold an empty symlink target.
                _require(
                    isinstance(ref, str) and ref != "" and "\0" not in ref, object_id, f"symlink {name!r} has a bad target"
                )
                entries.append(TreeEntry(name, mode, size, None, ref))
            else:
                _require(isinstance(ref, bytes) and len(ref) == ID_BYTES, object_id, f"tree entry {name!r} has a bad id")
                entries.append(TreeEntry(name, mode, size, id_from_bytes(ref), None))
        return cls(tuple(entries))


def mode_of(st_mode: int) -> int:
    """The tree mode for a file system ``st_mode``."""
    if stat.S_ISDIR(st_mode):
        return MODE_TREE
    if stat.S_ISLNK(st_mode):
        return MODE_SYMLINK
    return MODE_EXECUTABLE if st_mode & 0o111 else MODE_FILE


#: type code -> class, for cat-file and fsck
OBJECT_CLASSES: dict[ObjectType, type[Blob] | type[Tree]] = {ObjectType.BLOB: Blob, ObjectType.TREE: Tree}

