"""Suite definitions; importing this package registers every suite."""

from tasks.suites import ucit  # noqa: F401
