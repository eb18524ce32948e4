# -*- test-case-name: tests.test_events -*-
"""Pack and unpack ``google.protobuf.Any`` the way containerd's typeurl does.

containerd names a protobuf message in an Any by its bare full name
(``containerd.events.TaskExit``), without the ``type.googleapis.com/``
prefix Python's ``Any.Pack`` would add; clients look types up by that name.
"""

from __future__ import annotations

from google.protobuf import any_pb2, symbol_database
from google.protobuf.message import Message

from cdtwist.errors import NotFound


def type_url(message: Message) -> str:
    return message.DESCRIPTOR.full_name


def marshal_any(message: Message) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url(message), value=message.SerializeToString(deterministic=True))


def _load_known_types() -> None:
    # Importing registers the messages with the default symbol database.
    import importlib
    import pkgutil

    import cdtwist.api.events

    for info in pkgutil.iter_modules(cdtwist.api.events.__path__):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"cdtwist.api.events.{info.name}")


_load_known_types()


def message_class(url: str) -> type[Message] | None:
    name = url.rsplit("/", 1)[-1]
    try:
        return symbol_database.Default().GetSymbol(name)  # type: ignore[no-any-return]
    except KeyError:
        return None


def unmarshal_any(value: any_pb2.Any) -> Message:
    cls = message_class(value.type_url)
    if cls is None:
        raise NotFound(f"type with url {value.type_url}")
    message = cls()
    message.ParseFromString(value.value)
    return message
