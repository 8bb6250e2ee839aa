"""Make a sweep folder that reuses another's split and CPL mask for other seeds (device runs)."""

import json
import shutil
import sys
from pathlib import Path

source, target, seeds = Path(sys.argv[1]), Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
(target / "masks").mkdir(parents=True, exist_ok=True)
shutil.copytree(source / "split", target / "split", dirs_exist_ok=True)
shutil.copy2(source / "masks" / "cpl.safetensors", target / "masks" / "cpl.safetensors")
config = json.loads((source / "sweep_config.json").read_text())
config.update(seeds=seeds, out=str(target))
(target / "sweep_config.json").write_text(json.dumps(config, indent=2))
print("seeded", target, "seeds", seeds)
