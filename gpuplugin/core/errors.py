"""Request errors and the gRPC status each stands for (``gpuplugin.kubelet.service`` turns them into statuses)."""

from __future__ import annotations

from collections.abc import Iterable

from grpclib.const import Status

#: Enough IDs to find the culprit without echoing a huge request back.
_IDS_SHOWN = 10
#: The longest error message about a setting: a value quoted in it may be a whole megabyte of YAML.
MAX_MESSAGE_CHARS = 1000


class ConfigError(ValueError):
    """A setting is wrong; the message names it and what was expected. Retrying does not help."""

    def __init__(self, message: str) -> None:
        super().__init__(shorten(message))

    @classmethod
    def at(cls, path: str, message: str) -> ConfigError:
        """The error of the setting at ``path`` (``sharing.timeSlicing.resources[0].replicas``)."""
        return cls(f"{path}: {message}")


class DevicesRefuseConfig(ConfigError):
    """A setting that does not fit the devices found: too many replicas for the kubelet, a replica ID too long, MPS
    limits above a GPU's memory. Its own class because it is known only once the devices are: a reload refused this
    way has already replaced the pipeline, so the daemon restores the previous config rather than keep serving."""


def shorten(message: str) -> str:
    """``message`` on one line, cut to ``MAX_MESSAGE_CHARS``."""
    line = " ".join(message.splitlines())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


class RequestError(Exception):
    """A request the plugin refuses; the same request will be refused again."""

    status = Status.INVALID_ARGUMENT


class InvalidRequest(RequestError):
    """The request is malformed: empty, duplicated IDs, impossible sizes."""


class NotServing(RequestError):
    """The resource is shutting down or not served yet; the kubelet may retry once it registers again."""

    status = Status.UNAVAILABLE


class UnknownDevices(InvalidRequest):
    """The request names devices this resource does not have."""

    def __init__(self, resource: str, ids: Iterable[str]) -> None:
        super().__init__(f"unknown device IDs for {resource}: {show_ids(ids)}")


class UnhealthyDevices(RequestError):
    """The request names devices that are unhealthy now; it may succeed once they recover."""

    status = Status.FAILED_PRECONDITION

    def __init__(self, resource: str, ids: Iterable[str]) -> None:
        super().__init__(f"unhealthy devices for {resource}: {show_ids(ids)}")


class CdiSpecMissing(RequestError):
    """The devices' CDI specs are not on disk (a write failed): a response naming them would fail the container at
    creation, later and less clearly. It may succeed once the spec is written."""

    status = Status.FAILED_PRECONDITION

    def __init__(self, resource: str, names: Iterable[str]) -> None:
        super().__init__(
            f"{resource}: no CDI spec on disk for {show_ids(names)}: the plugin could not write it (its /readyz and "
            "log say why)"
        )


def show_ids(ids: Iterable[str]) -> str:
    listed = sorted(set(ids))
    shown = ", ".join(repr(i[:80]) for i in listed[:_IDS_SHOWN])
    return shown + (f" and {len(listed) - _IDS_SHOWN} more" if len(listed) > _IDS_SHOWN else "")
