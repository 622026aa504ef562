"""All settings of the review desk in one pydantic class (MONAI Label's ``config.py`` style)."""

from __future__ import annotations

import getpass
import ipaddress
import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pixelvote.errors import ConfigError
from pixelvote.review.store import DB_FILE

REVIEWER_PATTERN = r"^[\w .@'-]{1,64}$"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_reviewer() -> str:
    """The login name, made safe for the reviewer field (``reviewer`` when there is none)."""
    try:
        name = getpass.getuser()
    except Exception:  # no login name in some containers
        name = ""
    name = re.sub(r"[^\w .@'-]", "_", name)[:64]
    return name or "reviewer"


class ReviewSettings(BaseModel):
    """Settings of one review server.

    ``host`` other than a loopback address needs ``token``: then every request must present it
    (``Authorization: Bearer``, the ``X-Review-Token`` header, or the cookie set by opening
    ``/?token=…`` once). ``allowed_hosts`` are the names the browser may use in the ``Host`` header
    (default: the loopback names and ``host``; ``["*"]`` for any), which stops DNS-rebinding pages.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    out_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    reviewer: str = Field(default_factory=default_reviewer, pattern=REVIEWER_PATTERN)
    token: SecretStr | None = None
    db_path: Path | None = None
    allowed_hosts: tuple[str, ...] | None = None
    max_body_bytes: int = Field(24 << 20, ge=1024, description="largest request body accepted (413 above)")
    max_mask_bytes: int = Field(16 << 20, ge=1024, description="largest mask PNG accepted (422 above)")
    log_level: str = "info"

    @field_validator("token")
    @classmethod
    def _token_length(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 12:
            raise ValueError("expected a token of at least 12 characters (e.g. `openssl rand -hex 16`)")
        return v

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ReviewSettings:
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: other machines could reach the review "
                "desk, so a --token is required"
            )
        return self

    @property
    def database(self) -> Path:
        return self.db_path if self.db_path is not None else self.out_dir / DB_FILE

    @property
    def hosts(self) -> list[str]:
        if self.allowed_hosts is not None:
            return list(self.allowed_hosts)
        if not is_loopback(self.host) and self.host in ("0.0.0.0", "::", ""):
            return ["*"]  # listening everywhere: the token protects it
        return sorted({*LOOPBACK_NAMES, "[::1]", self.host.strip("[]")})

    @classmethod
    def build(cls, **values: Any) -> ReviewSettings:
        """Validate ``values``; a bad one raises :class:`ConfigError` naming the setting."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            msgs = []
            for e in exc.errors():
                where = ".".join(str(p) for p in e["loc"])
                msg = str(e["msg"]).removeprefix("Value error, ")
                msgs.append(f"{where}: {msg}" if where else msg)
            text = "; ".join(msgs)
            fix = ("keep --host 127.0.0.1, or pass --token (e.g. `--token $(openssl rand -hex 16)`, or set "
                   "PIXELVOTE_REVIEW_TOKEN)" if "token" in text else "see `pixelvote review --help`.")
            raise ConfigError(f"invalid review settings: {text}", fix=fix) from None
