"""An example third-party taskplex backend: ``taskplex.Executor("subprocess", workers=4)``."""

from taskplex_subprocess.server import SubprocessBackend, SubprocessServer

__all__ = ["SubprocessBackend", "SubprocessServer"]
