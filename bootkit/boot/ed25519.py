"""Ed25519 signature verification through the libcrypto that Python's ``hashlib`` already links.

The initramfs carries no crypto package: ``_hashlib`` (loaded by every boot, for SHA-256) and ``_ssl`` are
linked against OpenSSL's libcrypto, and dracut installs that library with them (module-setup.sh resolves the
C extensions' libraries with ldd). So verifying costs no bytes in the initramfs. The calls are OpenSSL's one-shot
signature API (``EVP_PKEY_new_raw_public_key``, ``EVP_DigestVerifyInit`` with no digest, ``EVP_DigestVerify``:
plain Ed25519 of RFC 8032, which OpenSSL 1.1.1 and 3.x both have; not Ed25519ph).

The library is found by where the process already mapped it (``/proc/self/maps`` after ``import _hashlib``),
then by its usual sonames: ``ctypes.util.find_library`` needs ``ldconfig`` or a compiler, which an
initramfs does not have.

Public keys are read in the two forms ``openssl`` and people write: a PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo
of RFC 8410) or the raw 32 bytes in base64.

Runs inside the initramfs: standard library only, Python >= 3.9.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import os
from typing import Any, List, Optional

from bootkit.errors import BootkitError

KEY_SIZE = 32
SIGNATURE_SIZE = 64
#: OpenSSL's NID_ED25519 (obj_mac.h), the key type EVP_PKEY_new_raw_public_key takes
EVP_PKEY_ED25519 = 1087
#: RFC 8410 section 4: SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) <32 bytes> }
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"
#: the sonames tried when the library is not mapped yet (OpenSSL 3, then 1.1)
_SONAMES = ("libcrypto.so.3", "libcrypto.so.1.1")


class BadKey(BootkitError):
    """A public key that is not an Ed25519 key in a form bootkit reads."""

    exit_status = 2


class CryptoUnavailable(BootkitError):
    """No libcrypto with Ed25519 could be loaded."""


def parse_public_key(text: str, where: str) -> bytes:
    """The raw 32-byte key of a PEM ``PUBLIC KEY`` or a base64 line; BadKey naming ``where`` otherwise."""
    text = text.strip()
    if text.startswith(_PEM_BEGIN):
        if not text.endswith(_PEM_END):
            raise BadKey(f"{where}: PEM public key without its END line")
        body = "".join(text[len(_PEM_BEGIN) : -len(_PEM_END)].split())
        der = _b64(body, where)
        if len(der) != len(SPKI_PREFIX) + KEY_SIZE or not der.startswith(SPKI_PREFIX):
            raise BadKey(f"{where}: not an Ed25519 public key (RFC 8410 SubjectPublicKeyInfo, 44 bytes)")
        return der[len(SPKI_PREFIX) :]
    if text.startswith("-----"):
        raise BadKey(f"{where}: a PEM file but not a PUBLIC KEY (give the public half: openssl pkey -pubout)")
    raw = _b64(text, where)
    if len(raw) != KEY_SIZE:
        raise BadKey(f"{where}: base64 of {len(raw)} bytes; an Ed25519 public key is {KEY_SIZE} bytes")
    return raw


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BadKey(f"{where}: neither a PEM public key nor base64") from None


def key_text(raw: bytes) -> str:
    """The one-line form of a key (base64 of the raw 32 bytes), as stored in the initramfs."""
    return base64.b64encode(raw).decode("ascii")


def fingerprint(raw: bytes) -> str:
    """A short name for a key on the console: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(raw).hexdigest()[:16]


def _mapped_libcrypto() -> Optional[str]:
    """The path of the libcrypto this process has mapped (through ``_hashlib``), or None."""
    try:
        import _hashlib  # noqa: F401  (links libcrypto; hashlib has loaded it already)
    except ImportError:
        return None
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                if os.path.basename(path).startswith("libcrypto.so") and path.startswith("/"):
                    return path
    except OSError:
        pass
    return None


class _Lib:
    """The libcrypto functions used, with their C signatures declared once."""

    def __init__(self) -> None:
        candidates: List[str] = []
        mapped = _mapped_libcrypto()
        if mapped:
            candidates.append(mapped)
        candidates += _SONAMES
        errors = []
        lib: Any = None
        for name in candidates:
            try:
                lib = ctypes.CDLL(name)
                lib.EVP_DigestVerify  # noqa: B018  (OpenSSL >= 1.1.1)
                break
            except (OSError, AttributeError) as e:
                errors.append(f"{name}: {e}")
                lib = None
        if lib is None:
            raise CryptoUnavailable("no libcrypto with Ed25519 (OpenSSL >= 1.1.1): " + "; ".join(errors))
        c_void_p, c_int, c_size_t, c_char_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p
        lib.EVP_PKEY_new_raw_public_key.restype = c_void_p
        lib.EVP_PKEY_new_raw_public_key.argtypes = [c_int, c_void_p, c_char_p, c_size_t]
        lib.EVP_PKEY_free.restype = None
        lib.EVP_PKEY_free.argtypes = [c_void_p]
        lib.EVP_MD_CTX_new.restype = c_void_p
        lib.EVP_MD_CTX_new.argtypes = []
        lib.EVP_MD_CTX_free.restype = None
        lib.EVP_MD_CTX_free.argtypes = [c_void_p]
        lib.EVP_DigestVerifyInit.restype = c_int
        lib.EVP_DigestVerifyInit.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p]
        lib.EVP_DigestVerify.restype = c_int
        lib.EVP_DigestVerify.argtypes = [c_void_p, c_char_p, c_size_t, c_char_p, c_size_t]
        lib.ERR_clear_error.restype = None
        lib.ERR_clear_error.argtypes = []
        self.lib = lib


_LIB: Optional[_Lib] = None


def _lib() -> Any:
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB.lib


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature (RFC 8032, pure) of ``message``."""
    if len(public_key) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    lib = _lib()
    pkey = lib.EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, None, public_key, KEY_SIZE)
    if not pkey:
        lib.ERR_clear_error()
        return False  # not a point on the curve: no signature can be this key's
    ctx = lib.EVP_MD_CTX_new()
    try:
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new")
        if lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) != 1:
            lib.ERR_clear_error()
            raise CryptoUnavailable("libcrypto refused to set up an Ed25519 verification")
        ok: bool = lib.EVP_DigestVerify(ctx, signature, len(signature), message, len(message)) == 1
        # a bad signature leaves an entry on OpenSSL's per-thread error queue; _ssl and _hashlib read that queue too
        lib.ERR_clear_error()
        return ok
    finally:
        if ctx:
            lib.EVP_MD_CTX_free(ctx)
        lib.EVP_PKEY_free(pkey)
