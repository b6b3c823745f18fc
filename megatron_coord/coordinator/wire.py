"""The coordinator's view of the wire: typed decoders and cheap frame checks, no state.

The hot messages are validated by msgspec decoders in C. A frame's header is read from its
first two bytes without decoding it (``peek_header``); anything unusual takes the slow, fully
validating path (``describe``) to say what is wrong with it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from ..protocol import ErrorCode, Headers, ProtocolError, decode

encode = msgspec.msgpack.Encoder().encode
any_decoder = msgspec.msgpack.Decoder()
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
# The prompt and sampling params of a SUBMIT_REQUEST stay raw msgpack, so a token prompt is
# forwarded to its engine without re-encoding.
submit_decoder = msgspec.msgpack.Decoder(tuple[int, int | str, msgspec.Raw, msgspec.Raw])
prompt_decoder = msgspec.msgpack.Decoder(str | list[NonNegInt])
reply_decoder = msgspec.msgpack.Decoder(tuple[int, list[dict[str, Any]]])


class PartialItem(msgspec.Struct, array_like=True):
    """One request's streaming chunk: ``[request_id, new_tokens]``, or with ``extras`` (the
    new tokens' ``generated_log_probs`` / ``generated_top_n_logprobs``, and
    ``skip_special_tokens`` when False) for a request that asked for them."""

    request_id: int
    tokens: list[NonNegInt]
    extras: dict[str, Any] | None = None


partial_decoder = msgspec.msgpack.Decoder(tuple[int, list[PartialItem]])
engine_error_decoder = msgspec.msgpack.Decoder(tuple[int, int, str, str])
heartbeat_decoder = msgspec.msgpack.Decoder(tuple[int, dict[str, Any]])
client_id_decoder = msgspec.msgpack.Decoder(tuple[int, int | str])
# msgspec raises UnicodeDecodeError, not a MsgspecError, for a str that is not UTF-8.
DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError)
MEGATRON_IDENTITY = re.compile(rb"^mp-coord-(\d+)$")
HEADER_ONLY = {h: encode([int(h)]) for h in Headers}


def peek_header(payload: bytes) -> int:
    """The header of a msgpack ``[header, ...]`` frame without decoding it (-1 if unusual).

    Every valid message is a fixarray (<= 15 fields) whose first element is a positive fixint
    (all header values are < 128), so two byte reads classify it.
    """
    if len(payload) >= 2 and 0x91 <= payload[0] <= 0x9F and payload[1] < 0x80:
        return payload[1]
    return -1


def describe(payload: bytes) -> ProtocolError:
    """Why a frame that failed the fast path is bad (for the ERROR reply)."""
    try:
        header = decode(payload)[0]
    except ProtocolError as exc:
        return exc
    return ProtocolError(ErrorCode.UNKNOWN_HEADER, f"unknown header {int(header)}")


def unexpected(header: int, payload: bytes, sender: str) -> ProtocolError:
    """The error for a frame no handler of ``sender`` ("client" or "engine") takes."""
    if header == -1:
        return describe(payload)
    if header in Headers._value2member_map_:
        return ProtocolError(
            ErrorCode.UNKNOWN_HEADER, f"{Headers(header).name} is not a {sender} message"
        )
    return ProtocolError(ErrorCode.UNKNOWN_HEADER, f"unknown header {header}")


def decode_as(decoder: msgspec.msgpack.Decoder, payload: bytes) -> Any:
    """Decode with a typed decoder; a frame of the wrong shape is a ``malformed`` error."""
    try:
        return decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"bad message: {exc}") from None


def check_header_only(payload: bytes) -> None:
    """Header-only messages are exactly one element: a fixarray of 1 and the header."""
    if payload[0] != 0x91 or len(payload) != 2:
        raise ProtocolError(ErrorCode.MALFORMED, "this message takes no fields")


def client_request_id_of(payload: bytes) -> Any:
    """Best-effort client_request_id of a rejected message, so the client can match the error."""
    try:
        message = any_decoder.decode(payload)
    except DECODE_ERRORS:
        return None
    if isinstance(message, list) and len(message) > 1 and type(message[1]) in (int, str):
        return message[1]
    return None


def tokens_of(value: Any) -> list[int]:
    """Token ids from a plain list or Megatron's serialized tensor ``["tensor", [ids]]``.

    Checked in C (``min``) rather than per element in Python, which cost more than everything
    else a reply needs; non-integer ids are refused by the detokenizer, whose errors fail only
    the request that carried them.
    """
    if value.__class__ is list and len(value) == 2 and value[0] == "tensor":
        value = value[1]
    if value.__class__ is not list:
        raise ProtocolError(ErrorCode.MALFORMED, "token ids must be a list")
    try:
        if value and min(value) < 0:
            raise ProtocolError(ErrorCode.MALFORMED, "token ids must be non-negative")
    except TypeError:
        raise ProtocolError(ErrorCode.MALFORMED, "token ids must be integers") from None
    return value
