"""Writes what it was given (argv, SM_* variables, the config files) to SM_OUTPUT_DATA_DIR."""

import json
import os
import sys
from pathlib import Path

out = os.environ["SM_OUTPUT_DATA_DIR"]
config_dir = os.environ["SM_INPUT_CONFIG_DIR"]
dump = {
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "env": {k: v for k, v in os.environ.items() if k.startswith("SM_") or k == "TRAINING_JOB_NAME"},
    "files": {
        name: json.loads(Path(config_dir, name).read_text())
        for name in ("hyperparameters.json", "inputdataconfig.json", "resourceconfig.json")
    },
}
with open(os.path.join(out, "env.json"), "w") as f:
    json.dump(dump, f)
