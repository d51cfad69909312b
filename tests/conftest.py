import sys
from pathlib import Path

# The scripts live at the top level, not in a package: make them importable from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
