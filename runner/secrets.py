"""Secrets: the environment variable NAME, else the file NAME in $RUNNER_SECRETS_DIR."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from .errors import RenderError, UsageError
from .redact import MASK, Redactor

SECRETS_DIR_VARIABLE = "RUNNER_SECRETS_DIR"


def read_secret(name: str, environ: Mapping[str, str]) -> str | None:
    """The secret's value, or None if neither the variable nor the file exists."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise UsageError(f"secret name {name!r} is refused: a name may not contain '/'")
    if name in environ:
        return environ[name]
    folder = environ.get(SECRETS_DIR_VARIABLE)
    if not folder:
        return None
    path = Path(folder) / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read secret {name!r} from {path}: {exc}") from exc
    # Files written by editors and `echo` end with one newline that is not part of the value.
    return text[:-1] if text.endswith("\n") else text


class Secrets(Mapping[str, str]):
    """The `secrets` of the scope. Names read statically are resolved before the first request;
    a name computed at run time is looked up on first use. Every value goes to the redactor."""

    def __init__(self, environ: Mapping[str, str], redactor: Redactor, *, masked: bool = False):
        self._environ = environ
        self._redactor = redactor
        self._masked = masked  # --dry-run: every secret shows as *** and need not exist
        self._values: dict[str, str] = {}

    def resolve(
        self, names: Iterable[str], where: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        """Resolve every name now; all missing ones are reported together (exit 2), with
        the places that read them when `where` gives them."""
        missing = []
        for name in sorted(names):
            if self._masked:
                continue
            value = read_secret(name, self._environ)
            if value is None:
                missing.append(name)
            else:
                self._store(name, value)
        if missing:
            also = f" or a file in ${SECRETS_DIR_VARIABLE}"
            places = [
                f"secret {name} is read at {'; '.join(dict.fromkeys(where[name]))}"
                for name in missing
                if where is not None and where.get(name)
            ]
            raise UsageError(
                "missing secret"
                + ("s " if len(missing) > 1 else " ")
                + ", ".join(missing)
                + f": set the environment variable{also}"
                + "".join("\n" + place for place in places)
            )

    def _store(self, name: str, value: str) -> None:
        self._values[name] = value
        self._redactor.add(value)

    def __getitem__(self, name: str) -> str:
        if self._masked:
            return MASK
        if name not in self._values:
            try:
                value = read_secret(name, self._environ)
            except UsageError as exc:
                raise RenderError(exc.message) from exc
            if value is None:
                raise KeyError(name)
            self._store(name, value)
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)
