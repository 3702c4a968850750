"""Suite definitions; importing this package registers every suite."""

from tasks.suites import coin, llava665k, llavac_ft, ucit  # noqa: F401
