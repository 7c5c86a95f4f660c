"""``python -m sim_pipeline.spark INPUT OUTPUT [--record] [...]``: the ``spark`` command, for
spark-submit (which starts the driver with this module's path, not the ``sim-pipeline`` script)."""

import sys

from sim_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["spark", *sys.argv[1:]]))
