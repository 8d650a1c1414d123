"""How chunkfold's Kafka clients authenticate: the security settings turned into the options of
aiokafka's clients (``client_options``) and of a Faust app (``faust_options``).

Every client chunkfold creates (the workers' consumers and producers, the transactional
producers, the state readers, the admin client, ``produce``, ``tail``, the audit sink, Faust's
clients) gets its options from here, through ``chunkfold.kafka_io.KafkaClients``:

* ``security_protocol``: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL;
* TLS (SSL, SASL_SSL): an ``ssl.SSLContext`` from aiokafka's ``create_ssl_context`` with the CA
  file (else the system's CAs), the client certificate and key for mutual TLS, hostname checks on;
* SASL (SASL_*): PLAIN and SCRAM-SHA-256/512 with a username and a password (the password from
  the environment or, better, a file), or OAUTHBEARER with a token read from a file at every
  authentication (``FileTokenProvider``). GSSAPI (Kerberos) is not offered.

Files are read when the options are built: an unreadable one is a ``SettingsError`` naming its
setting (one line, exit 2). Passwords stay ``SecretStr`` until handed to the client; nothing here
logs them.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context

from chunkfold.config import Settings, SettingsError


class FileTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """OAUTHBEARER: the access token in ``path``, read again on each call, so whatever refreshes
    the file (a sidecar, a projected service-account token) refreshes the client's token."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def token(self) -> str:
        return _read(self.path, "sasl_oauth_token_file")

    def __repr__(self) -> str:
        return f"FileTokenProvider({self.path!r})"


def _read(path: str, setting: str) -> str:
    """The file's text without surrounding blanks (a trailing newline is no part of a secret)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise SettingsError(f"{Settings.env_name(setting)}={path!r}: cannot read it ({reason})") from None
    if not text:
        raise SettingsError(f"{Settings.env_name(setting)}={path!r}: the file is empty")
    return text


def _secret(settings: Settings, name: str) -> str | None:
    """Setting ``name``'s secret: from its ``<name>_file`` when that is set, else its value."""
    file = str(getattr(settings, f"{name}_file"))
    if file:
        return _read(file, f"{name}_file")
    value = getattr(settings, name)
    return None if value is None else str(value.get_secret_value())


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of SSL and SASL_SSL (None for the others)."""
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    for setting in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = str(getattr(settings, setting))
        if path and not Path(path).is_file():
            raise SettingsError(f"{Settings.env_name(setting)}={path!r}: no such file")
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile or None,
            certfile=settings.ssl_certfile or None,
            keyfile=settings.ssl_keyfile or None,
            password=_secret(settings, "ssl_key_password"),
        )
    except ssl.SSLError as exc:
        raise SettingsError(f"the TLS files cannot be used: {exc.reason or exc}") from None
    context.check_hostname = settings.ssl_check_hostname
    return context


def client_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments that make an aiokafka client (consumer, producer, admin, client)
    connect as ``settings`` say: ``security_protocol``, ``ssl_context``, ``sasl_*``."""
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        if settings.sasl_mechanism == "OAUTHBEARER":
            options["sasl_oauth_token_provider"] = FileTokenProvider(settings.sasl_oauth_token_file)
        else:
            options["sasl_plain_username"] = settings.sasl_username
            options["sasl_plain_password"] = _secret(settings, "sasl_password")
    return options


def faust_options(settings: Settings) -> dict[str, Any]:
    """The ``faust.App`` settings for the same: ``broker_credentials`` (``SASLCredentials``,
    ``OAuthCredentials`` or ``SSLCredentials``), which faust-streaming's aiokafka transport maps
    onto the same ``security_protocol``, ``ssl_context`` and ``sasl_*`` options of every client it
    creates (``credentials_to_aiokafka_auth``); nothing for PLAINTEXT."""
    import faust
    from faust.auth import OAuthCredentials

    context = ssl_context(settings)
    if settings.security_protocol.startswith("SASL_"):
        if settings.sasl_mechanism == "OAUTHBEARER":
            credentials: Any = OAuthCredentials(
                oauth_cb=FileTokenProvider(settings.sasl_oauth_token_file), ssl_context=context
            )
        else:
            credentials = faust.SASLCredentials(
                username=settings.sasl_username,
                password=_secret(settings, "sasl_password"),
                ssl_context=context,
                mechanism=settings.sasl_mechanism,
            )
        return {"broker_credentials": credentials}
    if context is not None:
        return {"broker_credentials": faust.SSLCredentials(context)}
    return {}
