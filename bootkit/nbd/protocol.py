"""NBD protocol constants and wire structures (fixed newstyle handshake, transmission phase).

References: NetworkBlockDevice/nbd doc/proto.md ("NBDP"); names follow the spec (``NBD_OPT_GO``,
``NBD_FLAG_CAN_MULTI_CONN``, ``NBD_REPLY_TYPE_OFFSET_DATA``) with the ``NBD_`` prefix dropped only where the
class or module already says it. All integers on the wire are big-endian.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from bootkit.errors import NBDError

# -- handshake -----------------------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option reply magic

# handshake flags (server -> client, u16)
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
# client flags (client -> server, u32); the server must drop the connection on unknown bits
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

# option replies
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

# NBD_REP_INFO types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# "Strings ... MUST NOT exceed 4096 bytes" (NBDP Conventions); option data beyond this is a protocol error
MAX_STRING = 4096
MAX_OPTION_DATA = 64 * 1024

# -- transmission flags (u16, in NBD_INFO_EXPORT / EXPORT_NAME reply) ----------------------------------------

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# -- commands ----------------------------------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

# command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk flags and types
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# error values (NBDP "Error values"): not the host's errno numbers, though they coincide on Linux
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# base:allocation metadata context (NBDP "Metadata querying")
BASE_ALLOCATION = "base:allocation"
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# -- sizes ---------------------------------------------------------------------------------------------------

#: largest payload we accept or answer (the kernel's hard cap is 65536 sectors; NBDP wants >= 2^25 by default)
MAX_PAYLOAD = 32 * 1024 * 1024
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096

# -- structs -----------------------------------------------------------------------------------------------

#: S: NBDMAGIC, IHAVEOPT, handshake flags
SERVER_GREETING = struct.Struct(">QQH")
#: C: client flags
CLIENT_FLAGS = struct.Struct(">I")
#: C: IHAVEOPT, option, length (data follows)
OPTION_HEADER = struct.Struct(">QII")
#: S: reply magic, option, reply type, length (data follows)
OPTION_REPLY = struct.Struct(">QIII")
#: NBD_OPT_EXPORT_NAME reply: size, transmission flags (124 zero bytes follow unless NO_ZEROES)
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: NBD_INFO_EXPORT: type, size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE: type, minimum, preferred, maximum payload
INFO_BLOCK_SIZE = struct.Struct(">HIII")

#: C: magic, command flags, type, cookie, offset, length
REQUEST = struct.Struct(">IHHQQI")
#: S: magic, error, cookie
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: magic, flags, type, cookie, length (payload follows)
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: NBD_REPLY_TYPE_ERROR payload: error, message length (message follows)
REPLY_ERROR = struct.Struct(">IH")
#: NBD_REPLY_TYPE_OFFSET_DATA / OFFSET_HOLE payload start: offset (data follows) / offset, hole length
OFFSET_DATA = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")
#: NBD_REPLY_TYPE_BLOCK_STATUS: context id, then descriptors (length, status flags)
BLOCK_STATUS_HEADER = struct.Struct(">I")
BLOCK_DESCRIPTOR = struct.Struct(">II")

#: what the server offers every client: read-only, FLUSH and CACHE accepted (nothing to do), DF honoured,
#: several connections to one export see the same data
SERVER_FLAGS = (
    NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_READ_ONLY
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_DF
    | NBD_FLAG_CAN_MULTI_CONN
    | NBD_FLAG_SEND_CACHE
)
#: what the server offers the kernel, and clients without structured replies: no DF (NBDP: MUST NOT be set
#: unless structured replies were negotiated)
KERNEL_FLAGS = SERVER_FLAGS & ~NBD_FLAG_SEND_DF


class Request(NamedTuple):
    """One request of the transmission phase (NBDP "Request message"); a WRITE's payload is not part of it."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


class ProtocolError(NBDError):
    """The peer broke the protocol; the connection is dropped (the server keeps running)."""


class PeerClosed(Exception):
    """The peer closed the connection (EOF, reset)."""


COMMAND_NAMES = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
    NBD_CMD_RESIZE: "RESIZE",
}
