from tests.conftest import *  # noqa: F401,F403  (CAI_HOME and fixtures)
