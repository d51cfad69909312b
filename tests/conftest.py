import signal
import sys
from pathlib import Path

import pytest

# The scripts live at the top level, not in a package: make them importable from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The stop tests send Ctrl-C (SIGINT) to scripts run as children. A shell that starts a command in the
# background (`make test &`, `nohup ... &`) starts it with SIGINT ignored, every child inherits that,
# and Python then installs no KeyboardInterrupt for it: the script would run to its end. A child
# of the tests gets SIGINT as a terminal gives it (the default action, reset on exec).
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """models/ and screenshots/ in a temporary folder; the data is the project's, with the first
    200 test images standing for the 10,000 (these runs test what is written, not accuracy)."""
    import data
    import keras
    import models
    import runs

    load_data = data.load_data
    monkeypatch.setattr(data, "load_data", lambda kind: tuple(a[:200] if kind == "t10k" else a
                                                              for a in load_data(kind)))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(runs, "SCREENSHOTS_DIR", tmp_path / "screenshots")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    yield tmp_path
    keras.mixed_precision.set_global_policy("float32")
